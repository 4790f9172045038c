"""Conformance suite of :class:`sagellm.core.protocols.PrefixIndex`."""

from __future__ import annotations

from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sagellm.core.protocols import PrefixIndex
from sagellm.core.telemetry import PrefixCacheStats
from sagellm.core.testing._common import suite_settings
from sagellm.core.types import PrefixEntry, PrefixMatch

__all__ = ["PrefixIndexConformance"]


class PrefixIndexConformance:
    """Behaviour every prefix index shares. Subclass it and implement :meth:`make_index`.

    ``make_index(block_size)`` returns a fresh, empty index without a capacity limit of
    its own (it evicts only when :meth:`~sagellm.core.protocols.PrefixIndex.evict` is
    called). Block ids given to ``insert`` are unique across the suite.
    """

    #: Tokens per block in the example-based tests.
    block_size: ClassVar[int] = 4
    #: Hypothesis examples of the property tests.
    max_examples: ClassVar[int] = 40

    def make_index(self, block_size: int) -> Any:
        """A fresh index with ``block_size`` tokens per block (override this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_index(block_size)")

    def _index(self) -> Any:
        return self.make_index(self.block_size)

    def _tokens(self, num_blocks: int, start: int = 0, extra: int = 0) -> list[int]:
        return list(range(start, start + num_blocks * self.block_size + extra))

    # ------------------------------------------------------------------ basics

    def test_is_prefix_index(self) -> None:
        index = self._index()
        assert isinstance(index, PrefixIndex)
        assert index.block_size == self.block_size
        assert index.num_cached_blocks == 0
        assert list(index.entries()) == []

    def test_empty_index_matches_nothing(self) -> None:
        index = self._index()
        m = index.match(self._tokens(3, extra=1))
        assert isinstance(m, PrefixMatch)
        assert (m.block_ids, m.num_tokens, m.num_query_tokens) == ((), 0, 3 * self.block_size + 1)
        assert m.hit is False
        assert index.match([]).num_tokens == 0

    def test_insert_then_match_returns_the_inserted_blocks(self) -> None:
        index = self._index()
        bs = self.block_size
        tokens = self._tokens(3)
        assert index.insert(tokens, [10, 11, 12]) == [10, 11, 12]
        assert index.num_cached_blocks == 3
        m = index.match(tokens)
        assert (m.block_ids, m.num_tokens, m.num_query_tokens) == ((10, 11, 12), 3 * bs, 3 * bs)
        longer = index.match(tokens + [999, 998])
        assert (longer.block_ids, longer.num_tokens) == ((10, 11, 12), 3 * bs)
        assert longer.remaining_tokens == 2
        shorter = index.match(tokens[: 2 * bs - 1])
        assert (shorter.block_ids, shorter.num_tokens) == ((10,), bs)
        diverged = index.match(tokens[:bs] + [999] * bs)
        assert (diverged.block_ids, diverged.num_tokens) == ((10,), bs)

    def test_entries_cover_the_inserted_blocks(self) -> None:
        index = self._index()
        index.insert(self._tokens(2), [1, 2])
        entries = list(index.entries())
        assert all(isinstance(e, PrefixEntry) for e in entries)
        covered = {b for e in entries for b in e.kv_block_ids}
        assert covered == {1, 2}
        deepest = max(entries, key=lambda e: e.token_length)
        assert deepest.token_length == 2 * self.block_size
        assert deepest.kv_block_ids == (1, 2)

    def test_trailing_partial_block_is_not_indexed(self) -> None:
        index = self._index()
        tokens = self._tokens(2, extra=self.block_size - 1)
        assert index.insert(tokens, [5, 6, 7]) == [5, 6]
        assert index.num_cached_blocks == 2
        m = index.match(tokens)
        assert (m.block_ids, m.num_tokens) == ((5, 6), 2 * self.block_size)

    def test_insert_returns_only_newly_referenced_blocks(self) -> None:
        index = self._index()
        bs = self.block_size
        first = self._tokens(3)
        assert index.insert(first, [0, 1, 2]) == [0, 1, 2]
        second = first[: 2 * bs] + [500 + i for i in range(2 * bs)]
        assert index.insert(second, [20, 21, 22, 23]) == [22, 23]
        assert index.num_cached_blocks == 5
        assert index.match(second).block_ids == (0, 1, 22, 23)
        assert index.insert(first, [30, 31, 32]) == []
        assert index.match(first).block_ids == (0, 1, 2)
        assert index.num_cached_blocks == 5

    def test_isolation_keys_never_share(self) -> None:
        index = self._index()
        tokens = self._tokens(2)
        assert index.insert(tokens, [1, 2], isolation_key="tenant-a") == [1, 2]
        assert index.match(tokens).num_tokens == 0
        assert index.match(tokens, isolation_key="tenant-b").num_tokens == 0
        assert index.insert(tokens, [3, 4], isolation_key="tenant-b") == [3, 4]
        assert index.match(tokens, isolation_key="tenant-a").block_ids == (1, 2)
        assert index.match(tokens, isolation_key="tenant-b").block_ids == (3, 4)
        assert index.num_cached_blocks == 4

    # ------------------------------------------------------------------ lock / evict

    def test_locked_blocks_are_never_evicted(self) -> None:
        index = self._index()
        a = self._tokens(3)
        b = self._tokens(2, start=1000)
        index.insert(a, [1, 2, 3])
        index.insert(b, [7, 8])
        m = index.match(a)
        index.lock(m)
        assert sorted(index.evict(10)) == [7, 8]
        assert index.evict(10) == []
        assert index.match(a).block_ids == (1, 2, 3)
        index.unlock(m)
        assert sorted(index.evict(10)) == [1, 2, 3]
        assert index.num_cached_blocks == 0

    def test_locks_nest(self) -> None:
        index = self._index()
        tokens = self._tokens(1)
        index.insert(tokens, [4])
        m = index.match(tokens)
        index.lock(m)
        index.lock(m)
        index.unlock(m)
        assert index.evict(1) == []
        index.unlock(m)
        assert index.evict(1) == [4]

    def test_evict_takes_leaves_first_and_at_most_n(self) -> None:
        index = self._index()
        tokens = self._tokens(3)
        index.insert(tokens, [1, 2, 3])
        assert index.evict(0) == []
        assert index.evict(1) == [3]
        assert index.num_cached_blocks == 2
        assert index.match(tokens).block_ids == (1, 2)
        assert sorted(index.evict(5)) == [1, 2]
        assert index.match(tokens).num_tokens == 0

    def test_clear_releases_every_unlocked_block(self) -> None:
        index = self._index()
        a = self._tokens(2)
        index.insert(a, [1, 2])
        index.insert(self._tokens(1, start=1000), [3])
        m = index.match(a[: self.block_size])
        index.lock(m)
        assert sorted(index.clear()) == [2, 3]
        assert index.num_cached_blocks == 1
        index.unlock(m)
        assert index.clear() == [1]
        assert index.num_cached_blocks == 0

    def test_make_stats_reports_and_resets_counters(self) -> None:
        index = self._index()
        tokens = self._tokens(2)
        index.insert(tokens, [1, 2])
        index.match(tokens + [0])
        index.match(self._tokens(1, start=1000))
        stats = index.make_stats()
        assert isinstance(stats, PrefixCacheStats)
        assert (stats.num_lookups, stats.num_hits) == (2, 1)
        assert stats.num_query_tokens == 3 * self.block_size + 1
        assert stats.num_matched_tokens == 2 * self.block_size
        assert stats.num_cached_blocks == 2
        index.evict(1)
        again = index.make_stats()
        assert (again.num_lookups, again.num_hits, again.num_query_tokens) == (0, 0, 0)
        assert again.num_evicted_blocks == 1
        assert again.num_cached_blocks == 1
        assert index.make_stats().num_evicted_blocks == 0

    # ------------------------------------------------------------------ properties

    def test_random_operations_agree_with_a_model(self) -> None:
        """Insert, match, lock, unlock, evict and clear against a dictionary model.

        The model maps every cached prefix (a whole number of blocks) to the block that
        ends it. Checked: matches are the longest cached prefix, a multiple of the block
        size and never longer than the query; insert returns exactly the blocks of the
        uncached tail; keys never share; locked blocks survive evict and clear; evict
        returns at most ``n`` blocks the index referenced, leaves first, and no fewer than
        it could.
        """
        suite = self
        bs = 2
        tokens_st = st.lists(st.integers(0, 2), max_size=5 * bs)
        key_st = st.sampled_from(["", "tenant-a"])

        class IndexMachine(RuleBasedStateMachine):
            def __init__(self) -> None:
                super().__init__()
                self.index = suite.make_index(bs)
                self.model: dict[tuple[str, tuple[int, ...]], int] = {}
                self.locked: list[tuple[PrefixMatch, tuple[int, ...]]] = []
                self.next_id = 0

            def cached_prefix(self, tokens: list[int], key: str) -> list[int]:
                ids: list[int] = []
                for end in range(bs, len(tokens) + 1, bs):
                    block = self.model.get((key, tuple(tokens[:end])))
                    if block is None:
                        break
                    ids.append(block)
                return ids

            def locked_ids(self) -> set[int]:
                return {b for _, ids in self.locked for b in ids}

            def drop(self, released: list[int]) -> None:
                gone = set(released)
                assert len(gone) == len(released), f"a block was released twice: {released}"
                assert gone <= set(self.model.values()), f"released unknown blocks {released}"
                assert not gone & self.locked_ids(), f"released locked blocks {released}"
                self.model = {k: v for k, v in self.model.items() if v not in gone}

            @rule(tokens=tokens_st, key=key_st)
            def insert(self, tokens: list[int], key: str) -> None:
                n_full = len(tokens) // bs
                ids = list(range(self.next_id, self.next_id + n_full))
                self.next_id += n_full
                cached = len(self.cached_prefix(tokens, key))
                got = self.index.insert(tokens, ids, isolation_key=key)
                assert got == ids[cached:], f"insert returned {got}, expected {ids[cached:]}"
                for i in range(cached, n_full):
                    self.model[(key, tuple(tokens[: (i + 1) * bs]))] = ids[i]

            @rule(tokens=tokens_st, key=key_st)
            def match(self, tokens: list[int], key: str) -> None:
                m = self.index.match(tokens, isolation_key=key)
                expected = self.cached_prefix(tokens, key)
                assert m.num_query_tokens == len(tokens)
                assert m.num_tokens <= len(tokens) and m.num_tokens % bs == 0
                assert m.block_ids == tuple(expected)
                assert m.num_tokens == len(expected) * bs

            @rule(tokens=tokens_st, key=key_st)
            def lock(self, tokens: list[int], key: str) -> None:
                m = self.index.match(tokens, isolation_key=key)
                if m.hit:
                    self.index.lock(m)
                    self.locked.append((m, m.block_ids))

            @precondition(lambda self: bool(self.locked))
            @rule(i=st.integers(0, 1 << 16))
            def unlock(self, i: int) -> None:
                m, _ = self.locked.pop(i % len(self.locked))
                self.index.unlock(m)

            @rule(n=st.integers(0, 6))
            def evict(self, n: int) -> None:
                evictable = set(self.model.values()) - self.locked_ids()
                released = self.index.evict(n)
                assert len(released) == min(n, len(evictable)), (
                    f"evict({n}) released {released} with {len(evictable)} evictable blocks"
                )
                self.drop(released)

            @rule()
            def clear(self) -> None:
                expected = set(self.model.values()) - self.locked_ids()
                released = self.index.clear()
                assert set(released) == expected
                self.drop(released)

            @invariant()
            def consistent(self) -> None:
                assert self.index.num_cached_blocks == len(self.model)
                for key, prefix in self.model:  # leaves go first: no orphaned block
                    if len(prefix) > bs:
                        assert (key, prefix[:-bs]) in self.model

        run_state_machine_as_test(
            IndexMachine,
            settings=suite_settings(self.max_examples, stateful_step_count=30),
        )

    def test_match_never_reports_more_than_given(self) -> None:
        index = self._index()
        tokens = self._tokens(4)
        index.insert(tokens, [1, 2, 3, 4])
        for n in range(len(tokens) + 1):
            m = index.match(tokens[:n])
            assert m.num_tokens == n - n % self.block_size
            assert m.num_tokens <= n
            assert len(m.block_ids) == m.num_tokens // self.block_size
