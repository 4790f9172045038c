"""EngineBuilder: slots from the registry, capability checks, KV sizing."""

from __future__ import annotations

import pytest

from sagellm.core.config import EngineConfig
from sagellm.core.errors import CapabilityMismatchError, ConfigError, PluginNotFoundError
from sagellm.core.protocols import KVPool, Runtime, Scheduler
from sagellm.engine.args import make_engine_config
from sagellm.engine.builder import EngineBuilder
from sagellm.engine.config import BuildOptions

from .conftest import TINY_OPTIONS


def config(tiny_model, **kw) -> tuple[EngineConfig, BuildOptions]:
    return make_engine_config(model=str(tiny_model), **{**TINY_OPTIONS, **kw})


def test_builds_every_slot_and_binds_the_pool(tiny_model) -> None:
    cfg, opts = config(tiny_model, num_blocks=64)
    parts = EngineBuilder(cfg, opts).build()
    assert isinstance(parts.runtime, Runtime)
    assert isinstance(parts.kv_pool, KVPool)
    assert isinstance(parts.scheduler, Scheduler)
    assert parts.kv_pool.num_blocks == 64
    assert parts.kv_pool.schema == parts.runtime.kv_cache_schema(4)
    assert parts.schema.block_size == 4
    assert parts.max_model_len == 256
    assert parts.tokenizer is not None
    assert set(parts.components()) == {"runtime", "kv_pool", "scheduler"}


def test_pool_size_follows_the_memory_budget(tiny_model) -> None:
    cfg, _ = config(tiny_model)
    builder = EngineBuilder(cfg, BuildOptions(kv_cache_mib=1))
    runtime = builder.build_runtime()
    schema = runtime.kv_cache_schema(4)
    opts = builder.kv_pool_options(schema, 256)
    assert opts["num_blocks"] == min((1 << 20) // schema.bytes_per_block, 64 * 64)
    # explicit sizes are kept as given
    cfg, _ = config(tiny_model, kv_pool={"name": "paged", "options": {"memory_bytes": 4096}})
    assert EngineBuilder(cfg).kv_pool_options(schema, 256) == {"memory_bytes": 4096}


def test_wrong_device_is_explained(tiny_model) -> None:
    cfg, opts = config(tiny_model)
    caps = EngineBuilder(cfg, opts).build_runtime().capabilities()
    npu = EngineBuilder(cfg.model_copy(update={"device": "npu:0"}), opts)
    with pytest.raises(CapabilityMismatchError, match="asks for device 'npu:0'"):
        npu.check_capabilities(caps)


def test_max_model_len_beyond_the_model_is_refused(tiny_model) -> None:
    cfg, opts = config(tiny_model)
    caps = EngineBuilder(cfg, opts).build_runtime().capabilities()
    too_long = cfg.model_copy(update={"max_model_len": caps.max_model_len + 1})
    with pytest.raises(CapabilityMismatchError, match="positions"):
        EngineBuilder(too_long, opts).check_capabilities(caps)


def test_pool_smaller_than_an_explicit_context_is_refused(tiny_model) -> None:
    cfg, opts = config(tiny_model, num_blocks=8)  # 32 tokens < max_model_len 256
    with pytest.raises(CapabilityMismatchError, match="do not fit the KV pool"):
        EngineBuilder(cfg, opts).build()


def test_pool_smaller_than_the_model_shrinks_the_default_context(tiny_model) -> None:
    opts = {k: v for k, v in TINY_OPTIONS.items() if k != "max_model_len"}
    cfg, bopts = make_engine_config(model=str(tiny_model), num_blocks=8, **opts)
    parts = EngineBuilder(cfg, bopts).build()
    assert parts.max_model_len == 32


def test_unknown_components_name_the_package_to_install(tiny_model) -> None:
    cfg, opts = config(tiny_model, scheduler="no-such-scheduler")
    with pytest.raises(PluginNotFoundError, match="sagellm-scheduler-ir"):
        EngineBuilder(cfg, opts).build()


def test_unknown_engine_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown engine option 'max_seqs'"):
        make_engine_config(max_seqs=3)
