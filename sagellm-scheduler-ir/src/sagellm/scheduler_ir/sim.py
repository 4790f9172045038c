"""Block accounting without storage, for simulating schedulers (benchmarks, policy studies).

:class:`BlockLedger` honours the KV pool's allocation contract (ids, reference counts,
``None`` when full) but holds no tensors, so a scheduler can be replayed over thousands of
requests in milliseconds with only ``sagellm-core`` installed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from sagellm.core.telemetry import KVPoolStats
from sagellm.core.types import KVBlockInfo, KVCacheSchema

__all__ = ["BlockLedger"]


class BlockLedger:
    """Reference-counted block ids handed out from a LIFO free list; no KV storage."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.schema = KVCacheSchema(num_layers=1, num_kv_heads=1, head_dim=1, block_size=block_size)
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() yields 0, 1, 2, ...

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > len(self._free):
            return None
        out = [self._free.pop() for _ in range(num_blocks)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} is free and cannot be shared")
            self._refs[b] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        # validate the whole call first (duplicates included) so a bad id changes nothing
        drops = Counter(block_ids)
        for b, n in drops.items():
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block {b} does not exist (the ledger has {self.num_blocks})")
            if self._refs[b] < n:
                raise ValueError(
                    f"block {b} is freed {n} time(s) but holds {self._refs[b]} reference(s)"
                )
        released = []
        for b in block_ids:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                released.append(b)
        self._free.extend(reversed(released))  # the first freed is handed out first

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Nothing to copy: the ledger has no storage."""

    def layer_cache(self, layer: int) -> tuple[object, object]:
        raise TypeError("BlockLedger accounts for blocks only and has no KV storage")

    def block_info(self, block_id: int) -> KVBlockInfo:
        return KVBlockInfo(
            block_id=block_id, tier="ledger", size_bytes=0, ref_count=self._refs[block_id]
        )

    def make_stats(self) -> KVPoolStats:
        used = self.num_blocks - len(self._free)
        return KVPoolStats(
            num_blocks=self.num_blocks,
            num_used_blocks=used,
            num_free_blocks=len(self._free),
            utilization=used / self.num_blocks,
        )
