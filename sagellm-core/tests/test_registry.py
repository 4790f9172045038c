"""Entry-point discovery with a fake distribution installed in a temporary folder."""

from __future__ import annotations

import pytest
from conftest import FakeDist

from sagellm.core import registry
from sagellm.core.errors import ConfigError, PluginLoadError, PluginNotFoundError

GROUP = "sagellm.fake_slot"

GOOD = """
from typing import ClassVar
from pydantic import BaseModel, ConfigDict, Field

class GoodConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    capacity: int = Field(8, ge=1)
    decay: float = 0.5

class Good:
    config_class: ClassVar[type[BaseModel]] = GoodConfig

    def __init__(self, config, *, owner="nobody"):
        self.config = config
        self.owner = owner

class NoConfig:
    def __init__(self, **context):
        self.context = context

class Strict:
    config_class = GoodConfig

    def __init__(self, config):
        self.config = config
"""


@pytest.fixture
def plugins(fake_dist: FakeDist) -> None:
    fake_dist(
        "fake-plugins",
        "1.2.3",
        {
            GROUP: {
                "good": "fakeplug_good:Good",
                "noconf": "fakeplug_good:NoConfig",
                "strict": "fakeplug_good:Strict",
                "broken": "fakeplug_broken:Thing",
            }
        },
        {"fakeplug_good": GOOD, "fakeplug_broken": "raise ImportError('needs libfoo')\n"},
    )


@pytest.mark.usefixtures("plugins")
def test_available_lists_name_distribution_and_version() -> None:
    infos = registry.available(GROUP)
    assert [(i.name, i.distribution, i.version, i.allowed, i.error) for i in infos] == [
        ("broken", "fake-plugins", "1.2.3", True, None),
        ("good", "fake-plugins", "1.2.3", True, None),
        ("noconf", "fake-plugins", "1.2.3", True, None),
        ("strict", "fake-plugins", "1.2.3", True, None),
    ]
    assert infos[1].value == "fakeplug_good:Good"
    assert infos[1].group == GROUP


@pytest.mark.usefixtures("plugins")
def test_check_reports_import_errors() -> None:
    errors = {i.name: i.error for i in registry.available(GROUP, check=True)}
    assert errors == {"broken": "needs libfoo", "good": None, "noconf": None, "strict": None}


@pytest.mark.usefixtures("plugins")
def test_load_builds_from_validated_options() -> None:
    obj = registry.load(GROUP, "good", {"capacity": 4}, owner="pool")
    assert type(obj).__name__ == "Good"
    assert (obj.config.capacity, obj.config.decay, obj.owner) == (4, 0.5, "pool")
    assert registry.load_class(GROUP, "good") is type(obj)
    default = registry.load(GROUP, "good")
    assert default.config.capacity == 8


@pytest.mark.usefixtures("plugins")
def test_wrong_option_lists_valid_options() -> None:
    with pytest.raises(ConfigError) as info:
        registry.load(GROUP, "good", {"capcity": 4})
    assert str(info.value) == (
        f"{GROUP}:good: unknown option(s) capcity; valid options: capacity, decay"
    )


@pytest.mark.usefixtures("plugins")
def test_bad_option_value() -> None:
    with pytest.raises(ConfigError) as info:
        registry.load(GROUP, "good", {"capacity": 0})
    assert str(info.value) == (
        f"{GROUP}:good: invalid options: capacity: Input should be greater than or equal to 1"
    )


@pytest.mark.usefixtures("plugins")
def test_plugin_without_config_class() -> None:
    obj = registry.load(GROUP, "noconf", None, block_size=4)
    assert obj.context == {"block_size": 4}
    with pytest.raises(ConfigError) as info:
        registry.load(GROUP, "noconf", {"x": 1})
    assert str(info.value) == f"{GROUP}:noconf takes no options, got x"


@pytest.mark.usefixtures("plugins")
def test_unexpected_context_is_a_load_error() -> None:
    with pytest.raises(PluginLoadError, match=f"{GROUP}:strict could not be built"):
        registry.load(GROUP, "strict", {}, device="cpu")


@pytest.mark.usefixtures("plugins")
def test_import_failure_raises_plugin_load_error() -> None:
    with pytest.raises(PluginLoadError) as info:
        registry.load(GROUP, "broken")
    assert str(info.value) == (
        f"{GROUP} implementation 'broken' from fake-plugins failed to import: "
        "ImportError: needs libfoo"
    )
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.usefixtures("plugins")
def test_missing_plugin_lists_installed_ones() -> None:
    with pytest.raises(PluginNotFoundError) as info:
        registry.load(GROUP, "nope")
    assert str(info.value) == (
        f"no {GROUP} implementation named 'nope' is installed "
        "(installed: broken, good, noconf, strict)"
    )


def test_missing_plugin_names_distribution_and_extra() -> None:
    registry.reset_cache()
    with pytest.raises(PluginNotFoundError) as info:
        registry.load("eviction", "no-such-policy")
    assert str(info.value).startswith(
        "no sagellm.eviction implementation named 'no-such-policy' is installed (installed: "
    )
    assert str(info.value).endswith("; install sagellm-eviction (pip install 'sagellm[kv]')")
    with pytest.raises(PluginNotFoundError) as info:
        registry.load_class("topology", "nvlink-probe")
    assert str(info.value).endswith("; install sagellm-topology (pip install 'sagellm[comm]')")


@pytest.mark.usefixtures("plugins")
def test_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_PLUGINS", f"good, {GROUP}:noconf")
    allowed = {i.name: i.allowed for i in registry.available(GROUP, check=True)}
    assert allowed == {"broken": False, "good": True, "noconf": True, "strict": False}
    errors = {i.name: i.error for i in registry.available(GROUP, check=True)}
    assert errors["broken"] is None  # excluded plugins are not imported
    assert registry.load(GROUP, "good").config.capacity == 8
    assert registry.load(GROUP, "noconf").context == {}
    with pytest.raises(PluginNotFoundError) as info:
        registry.load(GROUP, "strict")
    assert str(info.value) == (
        f"{GROUP} implementation 'strict' is installed but excluded by SAGELLM_PLUGINS="
        f"'good, {GROUP}:noconf'; add 'strict' to that list"
    )


@pytest.mark.usefixtures("plugins")
def test_allow_list_applies_to_already_imported_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.load(GROUP, "strict")
    monkeypatch.setenv("SAGELLM_PLUGINS", "good")
    with pytest.raises(PluginNotFoundError, match="excluded by SAGELLM_PLUGINS"):
        registry.load(GROUP, "strict")
    monkeypatch.delenv("SAGELLM_PLUGINS")
    assert registry.load(GROUP, "strict").config.capacity == 8


def test_unknown_slot() -> None:
    with pytest.raises(ConfigError) as info:
        registry.available("nope")
    assert (
        str(info.value) == f"unknown slot 'nope'; valid slots: {', '.join(sorted(registry.GROUPS))}"
    )


def test_every_group_has_a_provider() -> None:
    assert set(registry.GROUP_PROVIDERS) == set(registry.GROUPS.values())
    assert registry.GROUPS["kv_pool"] == "sagellm.kv_pool"
