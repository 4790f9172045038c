"""Configuration of sagellm.kv_pool."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DEFAULT_DISK_BYTES",
    "DEFAULT_MEMORY_BYTES",
    "DiskTierConfig",
    "PagedKVPoolConfig",
    "TieredKVStoreConfig",
]

#: Pool size when no sizing option is given.
DEFAULT_MEMORY_BYTES = 512 * 1024 * 1024

#: Disk tier size when no sizing option is given (a sparse file: no space is used until
#: blocks are written, unless ``preallocate`` is set).
DEFAULT_DISK_BYTES = 1024 * 1024 * 1024

TIER_NAMES = ("device", "host", "disk")


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


class DiskTierConfig(BaseModel):
    """The disk tier: one file of fixed size, block ``i`` at byte offset ``i * block_bytes``.

    Give at most one of ``num_blocks`` and ``size_bytes``; with none the file holds
    :data:`DEFAULT_DISK_BYTES` (1 GiB).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_blocks: int | None = Field(None, ge=1)  # capacity in blocks
    size_bytes: int | None = Field(None, ge=1)  # capacity in bytes of the file
    directory: str | None = None  # where the file is created; None: the system temp dir
    preallocate: bool = False  # reserve the disk space up front (posix_fallocate)

    @model_validator(mode="after")
    def _one_size(self) -> DiskTierConfig:
        if self.num_blocks is not None and self.size_bytes is not None:
            raise ValueError(
                "num_blocks and size_bytes were given together; give at most one of them"
            )
        return self


class TieredKVStoreConfig(BaseModel):
    """Tiers of a :class:`~sagellm.kv_pool.tiered.TieredKVStore`, fastest first.

    ``device`` is a paged pool on the engine's device (the KVPool face of the store),
    sized by ``device`` or, when that is not given, by the top-level ``num_blocks`` /
    ``memory_bytes`` / ``memory_fraction`` (``device`` wins when both are given);
    ``host`` a paged pool in CPU memory (page-locked when CUDA is available); ``disk`` a
    file. Set ``host`` or ``disk`` to ``None`` to leave that tier out.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: PagedKVPoolConfig = PagedKVPoolConfig()  # size of the device tier
    # shortcuts for the device tier's size, used when ``device`` is not given (an engine
    # fills num_blocks from its KV memory budget the same way for every pool)
    num_blocks: int | None = Field(None, ge=1)
    memory_bytes: int | None = Field(None, ge=1)
    memory_fraction: float | None = Field(None, gt=0.0, le=0.95)
    host: PagedKVPoolConfig | None = PagedKVPoolConfig()  # size of the host tier
    disk: DiskTierConfig | None = DiskTierConfig()  # the disk tier
    quotas: dict[str, int] = Field(default_factory=dict)  # tenant -> max blocks held
    # tiers whose blocks count against a tenant's quota
    quota_tiers: tuple[str, ...] = ("device",)

    @model_validator(mode="after")
    def _check(self) -> TieredKVStoreConfig:
        for tenant, limit in self.quotas.items():
            if limit < 0:
                raise ValueError(f"quota of tenant {tenant!r} is {limit}; quotas are >= 0 blocks")
        if "device" not in self.model_fields_set:
            # validates "at most one of the three" with the pool config's own message
            PagedKVPoolConfig(
                num_blocks=self.num_blocks,
                memory_bytes=self.memory_bytes,
                memory_fraction=self.memory_fraction,
            )
        for tier in self.quota_tiers:
            if tier not in TIER_NAMES:
                raise ValueError(
                    f"quota_tiers names {tier!r}; valid tiers: {', '.join(TIER_NAMES)}"
                )
        return self

    def device_config(self) -> PagedKVPoolConfig:
        """Size of the device tier: ``device`` when given, else the shortcut fields."""
        if "device" in self.model_fields_set:
            return self.device
        return PagedKVPoolConfig(
            num_blocks=self.num_blocks,
            memory_bytes=self.memory_bytes,
            memory_fraction=self.memory_fraction,
        )
