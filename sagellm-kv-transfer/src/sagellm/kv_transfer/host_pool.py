"""A small KV pool over plain torch tensors, for a channel's benchmark and tests.

Anchor: the block half of vLLM's ``BlockPool`` (free list, reference counts), reduced to
what the KV pool protocol asks: this package transfers blocks of any pool and ships no
pool of its own to the engine (that is ``sagellm-kv-pool``); this one lets the channels be
measured and tested with only ``sagellm-core`` installed. Per layer, keys and values are
two contiguous tensors ``[num_blocks, block_size, heads, head_size]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from sagellm.core.telemetry import KVPoolStats
from sagellm.core.types import KVBlockInfo, KVCacheSchema

__all__ = ["HostKVPool", "HostKVPoolConfig"]


class HostKVPoolConfig(BaseModel):
    """Size of a :class:`HostKVPool`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_blocks: int = Field(16, ge=1)  # capacity in blocks


class HostKVPool:
    """Reference-counted blocks in per-layer key and value tensors (KV pool protocol)."""

    config_class: ClassVar[type[BaseModel]] = HostKVPoolConfig

    def __init__(
        self, config: HostKVPoolConfig, *, schema: KVCacheSchema, device: str = "cpu"
    ) -> None:
        self._schema = schema
        self._n = config.num_blocks
        self._ref = [0] * self._n
        self._free = list(range(self._n))
        self._counts = [0, 0, 0]  # allocations, failed allocations, frees
        shape = (self._n, schema.block_size, schema.num_kv_heads, schema.head_size)
        dtype = getattr(torch, schema.dtype)
        self._layers = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(schema.num_layers)
        ]

    @property
    def schema(self) -> KVCacheSchema:
        """Layout of every block."""
        return self._schema

    @property
    def num_blocks(self) -> int:
        """Capacity in blocks."""
        return self._n

    @property
    def num_free_blocks(self) -> int:
        """Blocks with reference count 0."""
        return len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        """True when :meth:`allocate` of ``num_blocks`` would succeed now."""
        return 0 <= num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """``num_blocks`` free blocks with one reference each; None when fewer are free."""
        if num_blocks < 0:
            raise ValueError(f"allocate: num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > len(self._free):
            self._counts[1] += 1
            return None
        ids = self._free[:num_blocks]
        del self._free[:num_blocks]
        for b in ids:
            self._ref[b] = 1
        self._counts[0] += 1
        return ids

    def _check(self, block_ids: Sequence[int], what: str, free: bool) -> None:
        need: dict[int, int] = {}
        for b in block_ids:
            if type(b) is not int or not 0 <= b < self._n:
                raise ValueError(f"{what}: unknown block {b!r} (ids are 0..{self._n - 1})")
            need[b] = need.get(b, 0) + 1
        for b, k in need.items():
            if self._ref[b] < (k if free else 1):
                raise ValueError(f"{what}: block {b} has {self._ref[b]} reference(s)")

    def share(self, block_ids: Sequence[int]) -> None:
        """One more reference to each (allocated) block."""
        self._check(block_ids, "share", free=False)
        for b in block_ids:
            self._ref[b] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """One reference less per block; nothing changes if any block lacks one."""
        self._check(block_ids, "free", free=True)
        for b in block_ids:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
                self._counts[2] += 1

    def ref_count(self, block_id: int) -> int:
        """Current reference count of ``block_id``."""
        return self._ref[block_id]

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy every layer's keys and values of ``src`` into ``dst``."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs])
        dst = torch.tensor([p[1] for p in pairs])
        for k, v in self._layers:
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))

    def layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value storage of one layer."""
        return self._layers[layer]

    def block_info(self, block_id: int) -> KVBlockInfo:
        """Reference count and size of one block."""
        return KVBlockInfo(block_id, "host", self._schema.bytes_per_block, self._ref[block_id])

    def make_stats(self) -> KVPoolStats:
        """Occupancy and counters since the last call."""
        used = self._n - len(self._free)
        stats = KVPoolStats(
            num_blocks=self._n,
            num_used_blocks=used,
            num_free_blocks=len(self._free),
            utilization=used / self._n,
            num_allocations=self._counts[0],
            num_failed_allocations=self._counts[1],
            num_frees=self._counts[2],
        )
        self._counts = [0, 0, 0]
        return stats
