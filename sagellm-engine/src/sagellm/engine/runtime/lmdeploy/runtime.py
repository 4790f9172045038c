"""LMDeployRuntime: lmdeploy's PyTorch engine, patched so sageLLM's policies steer it.

Anchor: ``lmdeploy.pytorch.engine.Engine.from_pretrained`` with a
``PytorchEngineConfig``. lmdeploy generates on CUDA, or on Ascend, Cambricon and MetaX
through dlinfer (``device_type`` ``ascend``, ``camb``, ``maca``); it has no CPU kernels.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from sagellm.core.errors import CapabilityMismatchError, ConfigError
from sagellm.engine.runtime.lmdeploy.hooks import LMDeployHooks
from sagellm.engine.runtime.lmdeploy.kv_manager import LMDeployKVManager
from sagellm.engine.runtime.lmdeploy.patches import LMDeployPatcher

__all__ = ["DEVICES", "LMDeployRuntime", "LMDeployRuntimeConfig"]

#: lmdeploy device types and how each is detected.
DEVICES = ("cuda", "ascend", "camb", "maca")


class LMDeployRuntimeConfig(BaseModel):
    """Options of the lmdeploy runtime (``PytorchEngineConfig`` fields it forwards)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = ""
    device: str = "cuda"
    tp: int = 1
    block_size: int = 64
    cache_max_entry_count: float = 0.8
    enable_prefix_caching: bool = True
    max_batch_size: int | None = None


def _device_available(device: str) -> bool:
    import torch

    if device == "cuda":
        return bool(torch.cuda.is_available())
    module = {"ascend": "npu", "camb": "mlu", "maca": "cuda"}[device]
    backend = getattr(torch, module, None)
    try:
        import dlinfer  # noqa: F401  (lmdeploy's vendor-device layer)
    except ImportError:
        return False
    return bool(backend is not None and backend.is_available())


class LMDeployRuntime:
    """Builds lmdeploy's PyTorch engine with sageLLM's patches applied.

    Raises :class:`~sagellm.core.errors.CapabilityMismatchError` at construction when no
    device lmdeploy runs on is present (the native runtime runs on CPU).
    """

    config_class: ClassVar[type[BaseModel]] = LMDeployRuntimeConfig

    def __init__(self, config: LMDeployRuntimeConfig | None = None, **options: Any) -> None:
        known = set(LMDeployRuntimeConfig.model_fields)
        cfg = config or LMDeployRuntimeConfig(**{k: v for k, v in options.items() if k in known})
        if cfg.device not in DEVICES:
            raise ConfigError(
                f"lmdeploy runtime device must be one of {', '.join(DEVICES)}, got {cfg.device!r}"
            )
        if not _device_available(cfg.device):
            raise CapabilityMismatchError(
                f"the lmdeploy runtime needs a {cfg.device} device (lmdeploy generates on CUDA, or "
                "Ascend/Cambricon/MetaX through dlinfer) and none is available here; use "
                "runtime='native', which runs on CPU"
            )
        from lmdeploy import PytorchEngineConfig
        from lmdeploy.pytorch.engine import Engine

        self.config = cfg
        self.hooks = LMDeployHooks()
        self.patcher = LMDeployPatcher(self.hooks).apply()
        engine_config = PytorchEngineConfig(
            tp=cfg.tp,
            block_size=cfg.block_size,
            cache_max_entry_count=cfg.cache_max_entry_count,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_batch_size=cfg.max_batch_size,
            device_type=cfg.device,
        )
        self.engine = Engine.from_pretrained(cfg.model, engine_config=engine_config)
        self.kv_manager = LMDeployKVManager(self.engine.scheduler, self.hooks)

    def close(self) -> None:
        """Stop lmdeploy's engine and undo the patches."""
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()
        self.patcher.unpatch()
