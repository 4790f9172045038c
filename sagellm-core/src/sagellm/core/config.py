"""Engine configuration.

An :class:`EngineConfig` holds the engine-wide settings and one :class:`ComponentSpec`
(``{name, options}``) per slot; each component validates its own ``options`` against its
``config_class`` when the registry builds it. Sources are merged in this order, later
ones winning: defaults, a YAML file, ``SAGELLM_*`` environment variables, explicit
overrides (CLI flags).

Environment variables: ``SAGELLM_<FIELD>`` sets a top-level field (``SAGELLM_DTYPE``);
``SAGELLM_<SLOT>__NAME`` and ``SAGELLM_<SLOT>__<OPTION>`` set a slot
(``SAGELLM_SCHEDULER__MAX_NUM_SEQS=32``). Values are parsed as YAML scalars.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sagellm.core.errors import ConfigError

__all__ = ["ComponentSpec", "EngineConfig", "SLOTS", "load_engine_config"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ComponentSpec(BaseModel):
    """Which implementation fills a slot, and its options."""

    model_config = _FROZEN

    name: str  # entry-point name within the slot's group
    options: dict[str, Any] = Field(default_factory=dict)  # validated by the component


#: Slots an engine assembles, in build order.
SLOTS = ("runtime", "kv_pool", "prefix_cache", "eviction", "lifetime", "scheduler")


class EngineConfig(BaseModel):
    """Everything an engine is built from."""

    model_config = _FROZEN

    model: str = "smollm2-135m"  # embedded model name, GGUF file or safetensors folder
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    served_model_name: str | None = None  # name reported by /v1/models (default: model)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: float32 on CPU
    device: str = "cpu"  # torch device string
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads (None: all cores)
    block_size: int = Field(16, ge=1, le=1024)  # tokens per KV block
    max_model_len: int | None = Field(None, ge=16)  # None: the model's maximum
    seed: int = 0  # default seed of requests that give none
    # weight quantizer (a name in sagellm.quantization: gguf, int8, int4, ...); None: a
    # GGUF checkpoint computes on its own quantized blocks ("gguf") when that quantizer is
    # installed, any other checkpoint in float; "none": float weights always
    quantization: str | None = None
    # pruning applied after loading, before quantization: "METHOD[,key=value...]" with
    # METHOD a name in sagellm.sparsity (magnitude, wanda, sparsegpt, structured), e.g.
    # "wanda,sparsity=0.5" or "structured,ffn_sparsity=0.3"; None: the dense model
    sparsity: str | None = None
    # KV cache element type; "auto": the compute dtype
    kv_cache_dtype: Literal["auto", "int8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    # kernel provider (a name in sagellm.kernels: compile, ...); None: eager PyTorch
    kernels: str | None = None
    runtime: ComponentSpec = ComponentSpec(name="native")
    kv_pool: ComponentSpec = ComponentSpec(name="paged")
    scheduler: ComponentSpec = ComponentSpec(name="fcfs")
    prefix_cache: ComponentSpec | None = None  # None: no prefix caching
    eviction: ComponentSpec | None = None  # policy used by the prefix cache and tiers
    lifetime: ComponentSpec | None = None  # reuse predictor for cost-aware eviction
    host: str = "127.0.0.1"  # server bind address
    port: int | None = Field(None, ge=0, le=65535)  # None: chosen by sagellm.core.ports

    def slot(self, name: str) -> ComponentSpec | None:
        """The spec of one slot (see :data:`SLOTS`)."""
        if name not in SLOTS:
            raise ConfigError(f"unknown slot {name!r}; valid slots: {', '.join(SLOTS)}")
        spec: ComponentSpec | None = getattr(self, name)
        return spec


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    fields = set(EngineConfig.model_fields)
    for raw_key, raw_value in environ.items():
        if not raw_key.startswith("SAGELLM_") or raw_key == "SAGELLM_PLUGINS":
            continue
        key = raw_key[len("SAGELLM_") :].lower()
        value = yaml.safe_load(raw_value) if raw_value != "" else None
        if "__" in key:
            slot, _, option = key.partition("__")
            if slot not in SLOTS:
                raise ConfigError(
                    f"environment variable {raw_key}: unknown slot {slot!r}; "
                    f"valid slots: {', '.join(SLOTS)}"
                )
            entry = layer.setdefault(slot, {})
            if option == "name":
                entry["name"] = value
            else:
                entry.setdefault("options", {})[option] = value
        elif key in fields:
            layer[key] = value
        # other SAGELLM_* variables belong to other tools (ports, plugins): not ours
    return layer


def _explain(exc: ValidationError, source: str) -> ConfigError:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            top = str(err["loc"][0])
            if top in SLOTS and len(err["loc"]) > 1:
                valid = ", ".join(sorted(ComponentSpec.model_fields))
            else:
                valid = ", ".join(sorted(EngineConfig.model_fields))
            parts.append(f"unknown key {loc!r} (valid keys: {valid})")
        else:
            parts.append(f"{loc}: {err['msg']}")
    return ConfigError(f"invalid engine config from {source}: " + "; ".join(parts))


def load_engine_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> EngineConfig:
    """Merge defaults, a YAML file, ``SAGELLM_*`` variables and overrides into a config.

    A wrong key raises :class:`ConfigError` listing the valid keys.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level")
        data = _deep_merge(data, loaded)
        source = str(p)
    env = _env_layer(os.environ if environ is None else environ)
    if env:
        data = _deep_merge(data, env)
        source += " + environment"
    if overrides:
        data = _deep_merge(data, {k: v for k, v in overrides.items() if v is not None})
        source += " + overrides"
    for slot in SLOTS:  # a slot given only options keeps its default implementation
        entry = data.get(slot)
        if isinstance(entry, Mapping) and "name" not in entry:
            default = EngineConfig.model_fields[slot].default
            if default is None:
                raise ConfigError(f"{source}: slot {slot!r} needs a 'name'")
            data[slot] = {"name": default.name, **entry}
    try:
        return EngineConfig(**data)
    except ValidationError as exc:
        raise _explain(exc, source) from exc
