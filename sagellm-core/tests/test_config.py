"""EngineConfig sources and their precedence: overrides > environment > YAML > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm.core.config import SLOTS, ComponentSpec, EngineConfig, load_engine_config
from sagellm.core.errors import ConfigError

VALID_KEYS = ", ".join(sorted(EngineConfig.model_fields))


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "engine.yaml"
    p.write_text(text)
    return p


def test_defaults() -> None:
    c = load_engine_config(environ={})
    assert c == EngineConfig()
    assert (c.model, c.block_size, c.device, c.port) == ("smollm2-135m", 16, "cpu", None)
    assert c.scheduler == ComponentSpec(name="fcfs")
    assert c.prefix_cache is None


def test_yaml_file(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        "block_size: 32\nscheduler:\n  options:\n    max_num_seqs: 8\n"
        "prefix_cache:\n  name: radix\n",
    )
    c = load_engine_config(path, environ={})
    assert c.block_size == 32
    assert c.scheduler == ComponentSpec(name="fcfs", options={"max_num_seqs": 8})
    assert c.prefix_cache == ComponentSpec(name="radix")


def test_environment_variables() -> None:
    env = {
        "SAGELLM_BLOCK_SIZE": "64",
        "SAGELLM_SCHEDULER__MAX_NUM_SEQS": "32",
        "SAGELLM_PREFIX_CACHE__NAME": "radix",
        "SAGELLM_DTYPE": "bfloat16",
        "SAGELLM_PLUGINS": "radix",  # the registry's, not config's
        "SAGELLM_SERVER_PORT": "9000",  # the ports module's
        "OTHER": "x",
    }
    c = load_engine_config(environ=env)
    assert (c.block_size, c.dtype) == (64, "bfloat16")
    assert c.scheduler == ComponentSpec(name="fcfs", options={"max_num_seqs": 32})
    assert c.prefix_cache == ComponentSpec(name="radix")


def test_precedence_overrides_then_env_then_yaml(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "block_size: 32\nseed: 5\nmodel: from-yaml\n")
    env = {"SAGELLM_BLOCK_SIZE": "64", "SAGELLM_SEED": "6"}
    c = load_engine_config(path, environ=env, overrides={"block_size": 128, "seed": None})
    assert (c.block_size, c.seed, c.model) == (128, 6, "from-yaml")
    c = load_engine_config(path, environ=env)
    assert (c.block_size, c.seed) == (64, 6)
    c = load_engine_config(path, environ={})
    assert (c.block_size, c.seed) == (32, 5)


def test_slot_options_merge_across_sources(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "scheduler:\n  name: slo\n  options:\n    a: 1\n    b: 2\n")
    c = load_engine_config(
        path,
        environ={"SAGELLM_SCHEDULER__B": "3"},
        overrides={"scheduler": {"options": {"c": 4}}},
    )
    assert c.scheduler == ComponentSpec(name="slo", options={"a": 1, "b": 3, "c": 4})


def test_wrong_top_level_key_lists_valid_keys(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "blok_size: 32\n")
    with pytest.raises(ConfigError) as info:
        load_engine_config(path, environ={})
    assert str(info.value) == (
        f"invalid engine config from {path}: unknown key 'blok_size' (valid keys: {VALID_KEYS})"
    )


def test_wrong_slot_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_engine_config(environ={}, overrides={"scheduler": {"name": "x", "option": {}}})
    assert str(info.value) == (
        "invalid engine config from defaults + overrides: unknown key 'scheduler.option' "
        "(valid keys: name, options)"
    )


def test_bad_value_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_engine_config(environ={"SAGELLM_BLOCK_SIZE": "0"})
    assert str(info.value) == (
        "invalid engine config from defaults + environment: "
        "block_size: Input should be greater than or equal to 1"
    )


def test_unknown_slot_in_environment() -> None:
    with pytest.raises(ConfigError) as info:
        load_engine_config(environ={"SAGELLM_FOO__BAR": "1"})
    assert str(info.value) == (
        f"environment variable SAGELLM_FOO__BAR: unknown slot 'foo'; valid slots: {', '.join(SLOTS)}"
    )


def test_optional_slot_needs_a_name() -> None:
    with pytest.raises(ConfigError) as info:
        load_engine_config(environ={"SAGELLM_PREFIX_CACHE__CAPACITY": "4"})
    assert str(info.value) == "defaults + environment: slot 'prefix_cache' needs a 'name'"


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_engine_config(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="must hold a mapping at top level"):
        load_engine_config(_yaml(tmp_path, "- a\n- b\n"), environ={})
    assert load_engine_config(_yaml(tmp_path, ""), environ={}) == EngineConfig()


def test_slot_accessor() -> None:
    c = EngineConfig(prefix_cache=ComponentSpec(name="radix"))
    assert c.slot("prefix_cache") == ComponentSpec(name="radix")
    assert c.slot("eviction") is None
    with pytest.raises(ConfigError) as info:
        c.slot("speculative")
    assert str(info.value) == f"unknown slot 'speculative'; valid slots: {', '.join(SLOTS)}"


def test_config_is_frozen() -> None:
    with pytest.raises(Exception, match="frozen"):
        EngineConfig().block_size = 8  # type: ignore[misc, unused-ignore]
