"""Property test: PagedKVPool against a plain reference model of reference counts."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sagellm.core.types import KVCacheSchema
from sagellm.kv_pool import PagedKVPool, PagedKVPoolConfig

NUM_BLOCKS = 12
SCHEMA = KVCacheSchema(num_layers=1, num_kv_heads=1, head_dim=2, block_size=2)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = PagedKVPool(PagedKVPoolConfig(num_blocks=NUM_BLOCKS), schema=SCHEMA)
        self.refs: Counter[int] = Counter()  # the model: references per allocated block
        # model of the LIFO free list: the last element is handed out next
        self.freed_order = list(range(NUM_BLOCKS - 1, -1, -1))

    @rule(n=st.integers(0, NUM_BLOCKS + 2))
    def allocate(self, n: int) -> None:
        free_before = self.pool.num_free_blocks
        got = self.pool.allocate(n)
        if n > free_before:
            assert got is None
            assert self.pool.num_free_blocks == free_before
            return
        assert got is not None and len(got) == n == len(set(got))
        expected = self.freed_order[len(self.freed_order) - n :][::-1] if n else []
        assert got == expected
        del self.freed_order[len(self.freed_order) - n :]
        for b in got:
            assert self.refs[b] == 0, f"block {b} handed out twice"
            self.refs[b] = 1

    @precondition(lambda self: bool(+self.refs))
    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(+self.refs)), max_size=4))
        self.pool.share(ids)
        for b in ids:
            self.refs[b] += 1

    @precondition(lambda self: bool(+self.refs))
    @rule(data=st.data())
    def free_valid(self, data: st.DataObject) -> None:
        held = sorted((+self.refs).elements())
        ids = data.draw(st.lists(st.sampled_from(held), max_size=6))
        counts = Counter(ids)
        ids = [b for b in ids if counts[b] <= self.refs[b]]  # at most one free per reference
        self.pool.free(ids)
        for b in ids:
            self.refs[b] -= 1
        # released blocks are reused first, in the order of their first appearance
        released = [b for b in dict.fromkeys(ids) if self.refs[b] == 0]
        self.freed_order.extend(reversed(released))

    @rule(data=st.data())
    def free_invalid_changes_nothing(self, data: st.DataObject) -> None:
        free_ids = [b for b in range(NUM_BLOCKS) if self.refs[b] == 0]
        bad = data.draw(
            st.sampled_from(free_ids + [NUM_BLOCKS, -3]) if free_ids else st.just(NUM_BLOCKS)
        )
        held = sorted(+self.refs)
        prefix = data.draw(st.lists(st.sampled_from(held), max_size=3)) if held else []
        prefix = [b for b in prefix if prefix.count(b) <= self.refs[b]]
        snapshot = [self.pool.ref_count(b) for b in range(NUM_BLOCKS)]
        named = f"unknown block id {bad}" if not 0 <= bad < NUM_BLOCKS else f"block {bad} is"
        with pytest.raises(ValueError, match=named):
            self.pool.free(prefix + [bad])
        assert [self.pool.ref_count(b) for b in range(NUM_BLOCKS)] == snapshot

    @precondition(lambda self: bool(+self.refs))
    @rule()
    def defragment(self) -> None:
        mapping = self.pool.defragment()
        moved = Counter({mapping.get(b, b): c for b, c in (+self.refs).items()})
        self.refs = moved
        used = len(+self.refs)
        assert sorted(+self.refs) == list(range(used))
        self.freed_order = list(range(NUM_BLOCKS - 1, used - 1, -1))

    @invariant()
    def consistent(self) -> None:
        pool = self.pool
        assert pool.num_free_blocks == NUM_BLOCKS - len(+self.refs)
        assert [pool.ref_count(b) for b in range(NUM_BLOCKS)] == [
            self.refs[b] for b in range(NUM_BLOCKS)
        ]
        assert sorted(pool._free) == sorted(set(pool._free))  # no block twice on the list
        assert pool._free == self.freed_order


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
