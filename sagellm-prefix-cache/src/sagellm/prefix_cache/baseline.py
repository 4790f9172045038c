"""Naive baseline for the benchmarks: a linear scan over stored prefixes.

Every inserted sequence is kept as it came; a lookup compares the query with each stored
sequence of the same isolation key block by block and keeps the longest common run of
full blocks. This is what a cache without an index costs, and what the radix tree and the
block-hash table are measured against. It has no locks and no eviction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sagellm.core.types import PrefixMatch

__all__ = ["LinearScanPrefixIndex"]


class LinearScanPrefixIndex:
    """Stored prefixes in a list; ``match`` scans all of them (O(prefixes x blocks))."""

    def __init__(self, *, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size}")
        self.block_size = block_size
        self._stored: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        self.lookup_ns: list[int] = []

    @property
    def num_prefixes(self) -> int:
        """Sequences stored."""
        return sum(len(v) for v in self._stored.values())

    def insert(
        self, token_ids: Sequence[int], block_ids: Sequence[int], isolation_key: str = ""
    ) -> list[int]:
        """Store the full blocks of ``token_ids`` with their block ids."""
        n = len(token_ids) // self.block_size
        tokens = tuple(token_ids[: n * self.block_size])
        self._stored.setdefault(isolation_key, []).append((tokens, tuple(block_ids[:n])))
        return list(block_ids[:n])

    def match(self, token_ids: Sequence[int], isolation_key: str = "") -> PrefixMatch:
        """Longest run of equal full blocks between the query and any stored sequence."""
        t0 = time.perf_counter_ns()
        bs = self.block_size
        num_query = len(token_ids)
        n_full = num_query - num_query % bs
        query = tuple(token_ids[:n_full])
        best_blocks = 0
        best_ids: tuple[int, ...] = ()
        for tokens, ids in self._stored.get(isolation_key, ()):
            limit = min(len(tokens), n_full)
            k = 0
            while k * bs < limit and tokens[k * bs : (k + 1) * bs] == query[k * bs : (k + 1) * bs]:
                k += 1
            if k > best_blocks:
                best_blocks, best_ids = k, ids
        match = PrefixMatch(best_ids[:best_blocks], best_blocks * bs, num_query)
        self.lookup_ns.append(time.perf_counter_ns() - t0)
        return match
