"""Model sources, configs, tokenizers, weight loaders and the Llama-family model."""

from sagellm.engine.models.config import ModelConfig
from sagellm.engine.models.source import ModelSource, resolve_model

__all__ = ["ModelConfig", "ModelSource", "resolve_model"]
