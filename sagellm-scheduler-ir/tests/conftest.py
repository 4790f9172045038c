"""A dict-based prefix index (tests only) and the block ledger as the pool."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest
from pydantic import BaseModel, ConfigDict

from sagellm.core.telemetry import PrefixCacheStats
from sagellm.core.types import PrefixEntry, PrefixMatch
from sagellm.scheduler_ir.sim import BlockLedger


class _NoOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DictPrefixIndex:
    """Full-block prefixes in a dict keyed by (isolation key, token tuple); LRU-free eviction."""

    config_class = _NoOptions

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._blocks: dict[tuple[str, tuple[int, ...]], int] = {}  # prefix -> last block
        self._locks: dict[int, int] = {}

    @property
    def num_cached_blocks(self) -> int:
        return len(self._blocks)

    def match(self, token_ids: Sequence[int], isolation_key: str = "") -> PrefixMatch:
        bs = self.block_size
        ids: list[int] = []
        for end in range(bs, len(token_ids) + 1, bs):
            b = self._blocks.get((isolation_key, tuple(token_ids[:end])))
            if b is None:
                break
            ids.append(b)
        return PrefixMatch(tuple(ids), len(ids) * bs, len(token_ids), handle=tuple(ids))

    def insert(
        self, token_ids: Sequence[int], block_ids: Sequence[int], isolation_key: str = ""
    ) -> list[int]:
        taken = []
        for i, b in enumerate(block_ids):
            key = (isolation_key, tuple(token_ids[: (i + 1) * self.block_size]))
            if key not in self._blocks:
                self._blocks[key] = b
                taken.append(b)
        return taken

    def lock(self, match: PrefixMatch) -> None:
        for b in match.handle:
            self._locks[b] = self._locks.get(b, 0) + 1

    def unlock(self, match: PrefixMatch) -> None:
        for b in match.handle:
            self._locks[b] -= 1

    def evict(self, num_blocks: int) -> list[int]:
        # deepest prefixes first, so a parent never goes before its child
        out = []
        for key in sorted(self._blocks, key=lambda k: -len(k[1])):
            if len(out) == num_blocks:
                break
            b = self._blocks[key]
            if self._locks.get(b, 0) == 0:
                del self._blocks[key]
                out.append(b)
        return out

    def entries(self) -> Iterable[PrefixEntry]:
        return [
            PrefixEntry(i, hash(k), len(k[1]), (b,), k[0])
            for i, (k, b) in enumerate(self._blocks.items())
        ]

    def clear(self) -> list[int]:
        return self.evict(len(self._blocks))

    def make_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(num_cached_blocks=len(self._blocks))


@pytest.fixture
def pool() -> BlockLedger:
    return BlockLedger(num_blocks=16, block_size=4)
