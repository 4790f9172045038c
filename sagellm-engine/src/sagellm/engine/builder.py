"""Assembly of an engine from an :class:`EngineConfig`.

Every slot is built through the registry by name, so an installed third-party package can
replace any component. Order: runtime (it knows the model and so the KV layout), KV pool
sized from a memory budget, the optional lifetime predictor, eviction policy and prefix
index, then the scheduler that ties pool and index together. Each step checks that what
was built fits what came before and explains what does not.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sagellm.core import registry
from sagellm.core.config import EngineConfig
from sagellm.core.errors import CapabilityMismatchError
from sagellm.core.protocols import KVPool, PrefixIndex, Runtime, Scheduler
from sagellm.core.types import KV_CACHE_DTYPES, CapabilityDescriptor, KVCacheSchema
from sagellm.engine.config import MAX_FULL_SEQUENCES, BuildOptions
from sagellm.engine.kv_tiers import TieredPrefixCache, is_tiered_store

__all__ = ["EngineBuilder", "EngineParts"]

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    """The assembled components of one engine."""

    config: EngineConfig
    runtime: Runtime
    kv_pool: KVPool
    scheduler: Scheduler
    capabilities: CapabilityDescriptor  # the runtime's
    schema: KVCacheSchema
    max_model_len: int  # longest sequence (prompt + output) the engine accepts
    model_name: str  # served name
    tokenizer: Any = None  # transformers tokenizer, None when built without one
    prefix_index: PrefixIndex | None = None
    eviction: Any = None
    lifetime: Any = None

    def components(self) -> dict[str, Any]:
        """Every built component by slot name (absent slots left out)."""
        out: dict[str, Any] = {
            "runtime": self.runtime,
            "kv_pool": self.kv_pool,
            "scheduler": self.scheduler,
        }
        for name in ("prefix_index", "eviction", "lifetime"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def _accepts(cls: Any, name: str) -> bool:
    """True when ``cls(config, **context)`` accepts the keyword ``name``."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return False
    return any(
        p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    )


def _is_plain(value: Any) -> bool:
    """True for values a pydantic config can hold (numbers, strings), not components."""
    return isinstance(value, (int, float, str, bool))


def _device_type(device: str) -> str:
    return device.split(":", 1)[0]


class EngineBuilder:
    """Builds :class:`EngineParts` from an :class:`EngineConfig`.

    Usage::

        from sagellm.core.config import load_engine_config
        parts = EngineBuilder(load_engine_config(overrides={"model": "smollm2-135m"})).build()
    """

    def __init__(
        self,
        config: EngineConfig,
        options: BuildOptions | None = None,
        *,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.options = options or BuildOptions()
        self._progress = progress or (lambda msg: logger.info(msg))

    # ------------------------------------------------------------------ public

    def build(self) -> EngineParts:
        """Load every slot, check they fit together and bind the pool to the runtime."""
        cfg = self.config
        self._progress(f"loading runtime {cfg.runtime.name!r} with model {cfg.model!r}")
        runtime = self.build_runtime()
        caps = runtime.capabilities()
        self.check_capabilities(caps)
        schema = runtime.kv_cache_schema(cfg.block_size)
        if schema.block_size != cfg.block_size:
            raise CapabilityMismatchError(
                f"runtime {cfg.runtime.name!r} returned a KV schema with block_size "
                f"{schema.block_size} for block_size={cfg.block_size}; the runtime must honour "
                "the requested block size"
            )
        if cfg.kv_cache_dtype != "auto" and schema.dtype != KV_CACHE_DTYPES[cfg.kv_cache_dtype]:
            raise CapabilityMismatchError(
                f"kv_cache_dtype={cfg.kv_cache_dtype!r} asks for a "
                f"{KV_CACHE_DTYPES[cfg.kv_cache_dtype]} KV cache but runtime "
                f"{cfg.runtime.name!r} laid it out in {schema.dtype}; use a runtime that "
                "stores quantized KV (native) or kv_cache_dtype='auto'"
            )
        # The runtime reports what the model supports; the config may ask for less.
        model_len = cfg.max_model_len or caps.max_model_len
        if model_len is None:
            raise CapabilityMismatchError(
                f"runtime {cfg.runtime.name!r} reports no max_model_len; set max_model_len in "
                "the engine config"
            )

        self._progress(f"allocating KV pool {cfg.kv_pool.name!r}")
        pool = self.build_kv_pool(schema, model_len)
        if pool.schema != schema:
            raise CapabilityMismatchError(
                f"KV pool {cfg.kv_pool.name!r} laid out {pool.schema!r} but runtime "
                f"{cfg.runtime.name!r} needs {schema!r}; check the pool's dtype/layout options"
            )
        runtime.bind_kv_pool(pool)
        max_model_len = self._fit_max_model_len(model_len, pool)

        lifetime = self._build_optional("lifetime", {})
        eviction_ctx: dict[str, Any] = {"capacity": pool.num_blocks}
        if lifetime is not None:
            # both names in use for the predictor a cost-aware policy consults
            eviction_ctx["lifetime_predictor"] = lifetime
            eviction_ctx["predictor"] = lifetime
        eviction = self._build_optional("eviction", eviction_ctx)
        index_ctx: dict[str, Any] = {"block_size": cfg.block_size}
        if eviction is not None:
            index_ctx["eviction_policy"] = eviction
        prefix_index = self._build_optional("prefix_cache", index_ctx)
        if prefix_index is not None and prefix_index.block_size != cfg.block_size:
            raise CapabilityMismatchError(
                f"prefix index {cfg.prefix_cache.name!r} uses block_size "  # type: ignore[union-attr]
                f"{prefix_index.block_size} but the KV pool uses {cfg.block_size}"
            )
        if prefix_index is not None and is_tiered_store(pool):
            # Blocks the device index evicts go down the tiers and come back on a hit; the
            # eviction slot also orders what the lower tiers drop (its own instance, without
            # the predictor: demoted blocks are never hit in place, only promoted).
            lower_policy = None
            if eviction is not None:
                store: Any = pool  # a tiered store: tiers() and tier() beside KVPool
                lower = sum(store.tier(t).num_blocks for t in store.tiers if t != "device")
                lower_policy = self._build_optional("eviction", {"capacity": lower})
            prefix_index = TieredPrefixCache(prefix_index, pool, lower_policy=lower_policy)

        self._progress(f"building scheduler {cfg.scheduler.name!r}")
        sched_ctx: dict[str, Any] = {"kv_pool": pool, "max_model_len": max_model_len}
        if prefix_index is not None:
            sched_ctx["prefix_index"] = prefix_index
        scheduler = registry.load(
            "scheduler", cfg.scheduler.name, cfg.scheduler.options, **sched_ctx
        )

        tokenizer = self.build_tokenizer(runtime) if self.options.load_tokenizer else None
        source = getattr(runtime, "source", None)
        model_name = cfg.served_model_name or getattr(source, "name", None) or cfg.model
        return EngineParts(
            config=cfg,
            runtime=runtime,
            kv_pool=pool,
            scheduler=scheduler,
            capabilities=caps,
            schema=schema,
            max_model_len=max_model_len,
            model_name=model_name,
            tokenizer=tokenizer,
            prefix_index=prefix_index,
            eviction=eviction,
            lifetime=lifetime,
        )

    def runtime_options(self) -> dict[str, Any]:
        """Options handed to the runtime: engine-wide fields it knows, then its own options."""
        cfg = self.config
        base: dict[str, Any] = {
            "model": cfg.model,
            "dtype": cfg.dtype,
            "device": cfg.device,
            "num_threads": cfg.num_threads,
            "max_model_len": cfg.max_model_len,
            "quantization": cfg.quantization,
            "sparsity": cfg.sparsity,
            "kv_cache_dtype": cfg.kv_cache_dtype if cfg.kv_cache_dtype != "auto" else None,
            "kernels": cfg.kernels,
        }
        base = {k: v for k, v in base.items() if v is not None}
        cls = registry.load_class("runtime", cfg.runtime.name)
        fields = getattr(getattr(cls, "config_class", None), "model_fields", None)
        if fields is not None:
            # Engine-wide settings are hints: a runtime that has no such option ignores them.
            base = {k: v for k, v in base.items() if k in fields}
        return {**base, **cfg.runtime.options}

    def build_runtime(self) -> Runtime:
        """The runtime slot, loaded with the model."""
        runtime = registry.load("runtime", self.config.runtime.name, self.runtime_options())
        if not isinstance(runtime, Runtime):
            raise CapabilityMismatchError(
                f"runtime {self.config.runtime.name!r} ({type(runtime).__name__}) does not "
                "implement sagellm.core.protocols.Runtime"
            )
        return runtime

    def check_capabilities(self, caps: CapabilityDescriptor) -> None:
        """Raise CapabilityMismatchError when the runtime cannot serve the config."""
        cfg = self.config
        dev = _device_type(cfg.device)
        if dev not in caps.devices:
            raise CapabilityMismatchError(
                f"runtime {cfg.runtime.name!r} runs on {', '.join(caps.devices)} but the config "
                f"asks for device {cfg.device!r}; set device to one of those or install a "
                "runtime for that device"
            )
        if cfg.dtype != "auto" and cfg.dtype not in caps.dtypes:
            raise CapabilityMismatchError(
                f"runtime {cfg.runtime.name!r} computes in {', '.join(caps.dtypes)} but the config "
                f"asks for dtype {cfg.dtype!r}; pick one of those (or 'auto')"
            )
        kv_dtype = KV_CACHE_DTYPES.get(cfg.kv_cache_dtype)
        if kv_dtype is not None and caps.kv_dtypes and kv_dtype not in caps.kv_dtypes:
            raise CapabilityMismatchError(
                f"runtime {cfg.runtime.name!r} stores KV caches in "
                f"{', '.join(caps.kv_dtypes)} but the config asks for kv_cache_dtype="
                f"{cfg.kv_cache_dtype!r} ({kv_dtype}); pick another or 'auto'"
            )
        if (
            cfg.max_model_len is not None
            and caps.max_model_len is not None
            and cfg.max_model_len > caps.max_model_len
        ):
            raise CapabilityMismatchError(
                f"max_model_len={cfg.max_model_len} exceeds the {caps.max_model_len} positions "
                f"model {cfg.model!r} supports; lower max_model_len"
            )
        if not (caps.supports_prefill and caps.supports_decode):
            raise CapabilityMismatchError(
                f"runtime {cfg.runtime.name!r} does only "
                f"{'prefill' if caps.supports_prefill else 'decode'}; a single-instance engine "
                "needs both"
            )

    def kv_pool_options(self, schema: KVCacheSchema, max_model_len: int) -> dict[str, Any]:
        """The pool's options, with ``num_blocks`` derived from the memory budget if unset."""
        cfg = self.config
        options = dict(cfg.kv_pool.options)
        cls = registry.load_class("kv_pool", cfg.kv_pool.name)
        fields = getattr(getattr(cls, "config_class", None), "model_fields", {})
        sized = any(k in options for k in ("num_blocks", "memory_bytes", "memory_fraction"))
        if "num_blocks" in fields and not sized:
            budget = self.options.kv_cache_mib * (1 << 20)
            by_memory = budget // schema.bytes_per_block
            by_need = MAX_FULL_SEQUENCES * schema.num_blocks_for(max_model_len)
            options["num_blocks"] = max(1, min(by_memory, by_need))
        return options

    def build_kv_pool(self, schema: KVCacheSchema, max_model_len: int) -> KVPool:
        """The KV pool slot, laid out from the runtime's schema on the configured device."""
        cfg = self.config
        pool = registry.load(
            "kv_pool",
            cfg.kv_pool.name,
            self.kv_pool_options(schema, max_model_len),
            schema=schema,
            device=cfg.device,
        )
        if not isinstance(pool, KVPool):
            raise CapabilityMismatchError(
                f"kv_pool {cfg.kv_pool.name!r} ({type(pool).__name__}) does not implement "
                "sagellm.core.protocols.KVPool"
            )
        return pool

    def build_tokenizer(self, runtime: Runtime) -> Any:
        """The tokenizer of ``config.tokenizer``, else of the runtime's model."""
        from sagellm.engine.models.source import resolve_model
        from sagellm.engine.models.tokenizer import load_tokenizer

        cfg = self.config
        if cfg.tokenizer is not None:
            return load_tokenizer(resolve_model(cfg.tokenizer))
        source = getattr(runtime, "source", None)
        return load_tokenizer(source if source is not None else resolve_model(cfg.model))

    # ------------------------------------------------------------------ helpers

    def _fit_max_model_len(self, model_len: int, pool: KVPool) -> int:
        capacity = pool.num_blocks * pool.schema.block_size
        if capacity >= model_len:
            return model_len
        if self.config.max_model_len is not None:
            raise CapabilityMismatchError(
                f"max_model_len={self.config.max_model_len} tokens do not fit the KV pool "
                f"({pool.num_blocks} blocks x {pool.schema.block_size} tokens = {capacity}); "
                "raise the pool's num_blocks or the KV budget (--kv-cache-mib), or lower "
                "max_model_len"
            )
        logger.warning(
            "KV pool holds %d tokens, fewer than the model's %d positions: max_model_len=%d",
            capacity,
            model_len,
            capacity,
        )
        return capacity

    def _build_optional(self, slot: str, context: Mapping[str, Any]) -> Any:
        spec = self.config.slot(slot)
        if spec is None:
            return None
        cls = registry.load_class(slot, spec.name)
        fields = getattr(getattr(cls, "config_class", None), "model_fields", {})
        options = dict(spec.options)
        ctx: dict[str, Any] = {}
        for key, value in context.items():
            if _accepts(cls, key):
                ctx[key] = value
            elif key in fields and key not in options and _is_plain(value):
                # e.g. an eviction policy that takes its capacity in its config
                options[key] = value
        return registry.load(slot, spec.name, options, **ctx)
