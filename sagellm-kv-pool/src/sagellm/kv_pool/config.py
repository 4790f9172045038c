"""Configuration of sagellm.kv_pool."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DEFAULT_MEMORY_BYTES", "PagedKVPoolConfig"]

#: Pool size when no sizing option is given.
DEFAULT_MEMORY_BYTES = 512 * 1024 * 1024


class PagedKVPoolConfig(BaseModel):
    """Size of a :class:`~sagellm.kv_pool.paged.PagedKVPool`.

    Give at most one of ``num_blocks``, ``memory_bytes`` and ``memory_fraction``; with none
    the pool takes :data:`DEFAULT_MEMORY_BYTES` (512 MiB). Byte sizes are turned into
    blocks as ``bytes // schema.bytes_per_block``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_blocks: int | None = Field(None, ge=1)  # capacity in blocks
    memory_bytes: int | None = Field(None, ge=1)  # capacity in bytes of KV storage
    # fraction of the device's currently free memory (CPU: MemAvailable of /proc/meminfo,
    # CUDA: torch.cuda.mem_get_info), 0 < f <= 0.95
    memory_fraction: float | None = Field(None, gt=0.0, le=0.95)

    @model_validator(mode="after")
    def _one_size(self) -> PagedKVPoolConfig:
        given = [
            name
            for name in ("num_blocks", "memory_bytes", "memory_fraction")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"{' and '.join(given)} were given together; give at most one of "
                "num_blocks, memory_bytes, memory_fraction"
            )
        return self
