"""Entry-point discovery of implementations.

Every slot has an entry-point group; a package registers its implementations in its
``pyproject.toml``::

    [project.entry-points."sagellm.kv_pool"]
    paged = "sagellm.kv_pool.paged:PagedKVPool"

:func:`available` lists what is installed (name, distribution, version, load error),
:func:`load` builds one by name from a config mapping. Groups are read once per process.
The ``SAGELLM_PLUGINS`` environment variable, a comma-separated list of names (``name``
or ``group:name``), restricts which implementations may load.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import BaseModel, ValidationError

from sagellm.core.errors import ConfigError, PluginLoadError, PluginNotFoundError

__all__ = [
    "GROUPS",
    "GROUP_PROVIDERS",
    "PluginInfo",
    "available",
    "load",
    "load_class",
    "reset_cache",
    "validate_options",
]

#: Entry-point group of each slot.
GROUPS: Mapping[str, str] = {
    "topology": "sagellm.topology",
    "comm_backend": "sagellm.comm_backend",
    "kv_transfer": "sagellm.kv_transfer",
    "overlap": "sagellm.overlap",
    "platform": "sagellm.platform",
    "prefix_cache": "sagellm.prefix_cache",
    "kv_pool": "sagellm.kv_pool",
    "eviction": "sagellm.eviction",
    "scheduler": "sagellm.scheduler",
    "lifetime": "sagellm.lifetime",
    "quantization": "sagellm.quantization",
    "sparsity": "sagellm.sparsity",
    "speculative": "sagellm.speculative",
    "kernels": "sagellm.kernels",
    "cot": "sagellm.cot",
    "runtime": "sagellm.runtime",
}

#: Distribution and meta-distribution extra that provide each group, for error messages.
GROUP_PROVIDERS: Mapping[str, tuple[str, str]] = {
    "sagellm.topology": ("sagellm-topology", "comm"),
    "sagellm.comm_backend": ("sagellm-collective-ops", "comm"),
    "sagellm.kv_transfer": ("sagellm-kv-transfer", "comm"),
    "sagellm.overlap": ("sagellm-overlap", "comm"),
    "sagellm.platform": ("sagellm-domestic-interconnect", "comm"),
    "sagellm.prefix_cache": ("sagellm-prefix-cache", "kv"),
    "sagellm.kv_pool": ("sagellm-kv-pool", "kv"),
    "sagellm.eviction": ("sagellm-eviction", "kv"),
    "sagellm.scheduler": ("sagellm-scheduler-ir", "kv"),
    "sagellm.lifetime": ("sagellm-lifetime", "kv"),
    "sagellm.quantization": ("sagellm-quantization", "accel"),
    "sagellm.sparsity": ("sagellm-sparsity", "accel"),
    "sagellm.speculative": ("sagellm-speculative", "accel"),
    "sagellm.kernels": ("sagellm-kernel-fusion", "accel"),
    "sagellm.cot": ("sagellm-cot", "accel"),
    "sagellm.runtime": ("sagellm-engine", "all"),
}


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One installed implementation."""

    group: str  # entry-point group
    name: str  # name users select it by
    value: str  # "module:attribute"
    distribution: str  # distribution that registered it ("" if unknown)
    version: str  # that distribution's version
    allowed: bool  # False when SAGELLM_PLUGINS excludes it
    error: str | None = None  # import error, filled by available(check=True)


_lock = threading.Lock()
_eps_cache: dict[str, list[EntryPoint]] = {}
_class_cache: dict[tuple[str, str], Any] = {}
# (distribution, version) per entry point: reading them parses METADATA files each time
_dist_cache: dict[tuple[str, str, str], tuple[str, str]] = {}


def reset_cache() -> None:
    """Forget discovered entry points (tests install plugins at run time)."""
    with _lock:
        _eps_cache.clear()
        _class_cache.clear()
        _dist_cache.clear()


def _group_name(group: str) -> str:
    if group in GROUPS:
        return GROUPS[group]
    if group.startswith("sagellm."):
        return group
    raise ConfigError(f"unknown slot {group!r}; valid slots: {', '.join(sorted(GROUPS))}")


def _entry_points(group: str) -> list[EntryPoint]:
    with _lock:
        if group not in _eps_cache:
            eps = sorted(entry_points(group=group), key=lambda ep: ep.name)
            _eps_cache[group] = list(eps)
        return _eps_cache[group]


def _distribution(group: str, ep: EntryPoint) -> tuple[str, str]:
    key = (group, ep.name, ep.value)
    with _lock:
        cached = _dist_cache.get(key)
    if cached is not None:
        return cached
    dist = getattr(ep, "dist", None)
    found = (dist.metadata["Name"] or "", dist.version or "") if dist is not None else ("", "")
    with _lock:
        _dist_cache[key] = found
    return found


def _allow_list() -> set[str] | None:
    raw = os.environ.get("SAGELLM_PLUGINS", "").strip()
    if not raw:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def _is_allowed(group: str, name: str, allow: set[str] | None) -> bool:
    return allow is None or name in allow or f"{group}:{name}" in allow


def available(group: str, *, check: bool = False) -> list[PluginInfo]:
    """Installed implementations of ``group`` (a slot name or a full group name).

    With ``check=True`` every allowed plugin is imported and an import failure is
    reported in :attr:`PluginInfo.error` instead of being dropped.
    """
    group = _group_name(group)
    allow = _allow_list()
    out = []
    for ep in _entry_points(group):
        distribution, version = _distribution(group, ep)
        allowed = _is_allowed(group, ep.name, allow)
        error = None
        if check and allowed:
            try:
                load_class(group, ep.name)
            except PluginLoadError as exc:
                error = str(exc.__cause__ or exc)
        out.append(
            PluginInfo(
                group=group,
                name=ep.name,
                value=ep.value,
                distribution=distribution,
                version=version,
                allowed=allowed,
                error=error,
            )
        )
    return out


def _missing_message(group: str, name: str, installed: list[str]) -> str:
    dist, extra = GROUP_PROVIDERS.get(group, ("", ""))
    have = ", ".join(installed) if installed else "none"
    hint = ""
    if dist:
        hint = f"; install {dist} (pip install 'sagellm[{extra}]')"
    return f"no {group} implementation named {name!r} is installed (installed: {have}){hint}"


def load_class(group: str, name: str) -> Any:
    """Import the object registered as ``name`` in ``group`` (cached per process)."""
    group = _group_name(group)
    key = (group, name)
    matches = [ep for ep in _entry_points(group) if ep.name == name]
    if not matches:
        raise PluginNotFoundError(
            _missing_message(group, name, [ep.name for ep in _entry_points(group)])
        )
    # the allow-list is read on every call, so a class imported earlier in the process
    # cannot slip past a list set afterwards
    if not _is_allowed(group, name, _allow_list()):
        raise PluginNotFoundError(
            f"{group} implementation {name!r} is installed but excluded by SAGELLM_PLUGINS="
            f"{os.environ.get('SAGELLM_PLUGINS')!r}; add {name!r} to that list"
        )
    with _lock:
        if key in _class_cache:
            return _class_cache[key]
    ep = matches[0]
    try:
        obj = ep.load()
    except Exception as exc:  # any import-time failure of a third-party plugin
        who = _distribution(group, ep)[0] or ep.value
        raise PluginLoadError(
            f"{group} implementation {name!r} from {who} failed to import: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    with _lock:
        _class_cache[key] = obj
    return obj


def validate_options(
    config_class: type[BaseModel], options: Mapping[str, Any], where: str
) -> BaseModel:
    """Build ``config_class`` from ``options``; a wrong key or value raises ConfigError."""
    valid = sorted(config_class.model_fields)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"{where}: unknown option(s) {', '.join(unknown)}; valid options: "
            f"{', '.join(valid) if valid else '(none)'}"
        )
    try:
        return config_class(**options)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{where}: invalid options: {details}") from exc


def load(group: str, name: str, options: Mapping[str, Any] | None = None, **context: Any) -> Any:
    """Build the implementation ``name`` of ``group`` as ``cls(config, **context)``.

    ``options`` are validated against the class's ``config_class`` (a frozen pydantic
    model); an implementation without one takes no options and is called with context
    only.
    """
    group = _group_name(group)
    cls = load_class(group, name)
    options = dict(options or {})
    config_class = getattr(cls, "config_class", None)
    where = f"{group}:{name}"
    if config_class is None:
        if options:
            raise ConfigError(f"{where} takes no options, got {', '.join(sorted(options))}")
        return cls(**context)
    config = validate_options(config_class, options, where)
    try:
        return cls(config, **context)
    except TypeError as exc:
        raise PluginLoadError(f"{where} could not be built: {exc}") from exc
