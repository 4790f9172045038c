"""Configuration of the engine's own parts (assembly budget and HTTP server).

The slots (runtime, KV pool, scheduler, ...) are configured through
:class:`sagellm.core.config.EngineConfig`; what is here only concerns the engine package.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_KV_CACHE_MIB", "BuildOptions", "ServerConfig"]

#: KV-cache budget when the pool's options give no size. 256 MiB holds ~11,600 tokens of
#: SmolLM2-135M in bfloat16 (the default dtype on CPUs with native bf16), ~5,800 in
#: float32; with the ~1.1-1.2 GB the loaded model takes, a fully used pool keeps the
#: default engine under 1.5 GB resident (untouched blocks are not resident at all).
DEFAULT_KV_CACHE_MIB = 256

#: A pool never gets more blocks than this many full-length sequences need (a tiny model
#: would otherwise receive millions of blocks from the memory budget).
MAX_FULL_SEQUENCES = 64


class BuildOptions(BaseModel):
    """How the builder sizes what the config leaves open."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kv_cache_mib: int = Field(DEFAULT_KV_CACHE_MIB, ge=1)  # KV budget when num_blocks is unset
    load_tokenizer: bool = True  # False: token ids in, token ids out (no text)


class ServerConfig(BaseModel):
    """Options of the OpenAI-compatible HTTP server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"  # bind address
    port: int | None = Field(None, ge=0, le=65535)  # None: chosen by sagellm.core.ports
    served_model_name: str | None = None  # name in /v1/models (default: the model's name)
    max_concurrent_requests: int = Field(1024, ge=1)  # further requests get 503
    log_level: str = "warning"  # uvicorn log level
