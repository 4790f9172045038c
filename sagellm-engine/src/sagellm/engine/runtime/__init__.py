"""The native PyTorch runtime: executes execution plans on a Llama-family model."""

from sagellm.engine.runtime.config import NativeRuntimeConfig

__all__ = ["NativeRuntimeConfig"]
