"""Random insert/match/lock/unlock/evict/clear sequences against a reference model.

Four indexes receive the same operations: radix and block-hash with the built-in LRU
(which must agree with each other on every result, evictions included) and both with an
injected FIFO policy. Each index has its own model: the set of cached prefixes (as tuples
of blocks) with their block ids, and the locked prefixes.
"""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
from _policies import FifoPolicy
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sagellm.core.types import PrefixMatch
from sagellm.prefix_cache import BlockHashPrefixIndex, RadixPrefixIndex

BS = 2
KEYS = ("", "tenant")
tokens_st = st.lists(st.integers(0, 2), max_size=11)
key_st = st.sampled_from(KEYS)

Blocks = tuple[tuple[int, ...], ...]


def blocks_of(tokens: list[int]) -> Blocks:
    n = len(tokens) // BS
    return tuple(tuple(tokens[i * BS : (i + 1) * BS]) for i in range(n))


class Model:
    """What one index should hold."""

    def __init__(self) -> None:
        self.cached: dict[tuple[str, Blocks], int] = {}  # (key, prefix) -> its last block
        self.locks: list[tuple[PrefixMatch, str, Blocks]] = []
        self.stamp: dict[tuple[str, Blocks], int] = {}  # last operation that went through

    def touch(self, key: str, blocks: Blocks, tick: int) -> None:
        for i in range(1, len(blocks) + 1):
            self.stamp[(key, blocks[:i])] = tick

    def lru_victims(self, num: int) -> list[int]:
        """Blocks an exact LRU, leaf-first policy gives up (deepest block first)."""
        locked = self.locked_prefixes()
        cached = dict(self.cached)
        out = []
        while len(out) < num:
            parents = {(k, b[:-1]) for k, b in cached}
            leaves = [p for p in cached if p not in parents and p not in locked]
            if not leaves:
                break
            victim = min(leaves, key=lambda p: self.stamp[p])
            out.append(cached.pop(victim))
        return out

    def longest(self, key: str, blocks: Blocks) -> tuple[int, ...]:
        ids = []
        for i in range(1, len(blocks) + 1):
            bid = self.cached.get((key, blocks[:i]))
            if bid is None:
                break
            ids.append(bid)
        return tuple(ids)

    def locked_prefixes(self) -> set[tuple[str, Blocks]]:
        out = set()
        for _, key, blocks in self.locks:
            for i in range(1, len(blocks) + 1):
                out.add((key, blocks[:i]))
        return out


class PrefixIndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.indexes: list[Any] = [
            RadixPrefixIndex(block_size=BS),
            BlockHashPrefixIndex(block_size=BS),
            RadixPrefixIndex(block_size=BS, eviction_policy=FifoPolicy()),
            BlockHashPrefixIndex(block_size=BS, eviction_policy=FifoPolicy()),
        ]
        self.models = [Model() for _ in self.indexes]
        self.next_block = 0
        self.tick = 0
        self.reported: list[set[int]] = [set() for _ in self.indexes]  # ids given back

    @rule(tokens=tokens_st, key=key_st)
    def insert(self, tokens: list[int], key: str) -> None:
        self.tick += 1
        blocks = blocks_of(tokens)
        ids = list(range(self.next_block, self.next_block + len(blocks) + 1))  # +1 partial
        self.next_block += len(ids)
        results = []
        for index, model in zip(self.indexes, self.models):
            cached = len(model.longest(key, blocks))
            got = index.insert(tokens, ids, key)
            assert got == ids[cached : len(blocks)]
            for i in range(cached, len(blocks)):
                model.cached[(key, blocks[: i + 1])] = ids[i]
            model.touch(key, blocks, self.tick)
            results.append(got)
        assert results[0] == results[1]

    @rule(tokens=tokens_st, key=key_st)
    def match(self, tokens: list[int], key: str) -> None:
        self.tick += 1
        blocks = blocks_of(tokens)
        results = []
        for index, model in zip(self.indexes, self.models):
            m = index.match(tokens, key)
            expected = model.longest(key, blocks)
            assert m.block_ids == expected
            assert m.num_tokens == len(expected) * BS <= len(tokens)
            assert m.num_query_tokens == len(tokens)
            model.touch(key, blocks[: len(expected)], self.tick)
            results.append(m.block_ids)
        assert results[0] == results[1]

    @rule(tokens=tokens_st, key=key_st)
    def lock(self, tokens: list[int], key: str) -> None:
        self.tick += 1
        blocks = blocks_of(tokens)
        for index, model in zip(self.indexes, self.models):
            m = index.match(tokens, key)
            model.touch(key, blocks[: m.num_tokens // BS], self.tick)
            if not m.hit:
                continue
            index.lock(m)
            model.locks.append((m, key, blocks[: m.num_tokens // BS]))

    @precondition(lambda self: any(model.locks for model in self.models))
    @rule(pick=st.integers(0, 1000))
    def unlock(self, pick: int) -> None:
        for index, model in zip(self.indexes, self.models):
            if model.locks:
                m, _, _ = model.locks.pop(pick % len(model.locks))
                index.unlock(m)

    @rule(num=st.integers(0, 8))
    def evict(self, num: int) -> None:
        results = []
        for i, (index, model) in enumerate(zip(self.indexes, self.models)):
            locked = model.locked_prefixes()
            evictable = len(model.cached) - len(locked)
            lru = model.lru_victims(num)
            got = index.evict(num)
            if index.eviction_policy is None:
                assert got == lru
            assert len(got) == min(num, evictable)
            assert len(set(got)) == len(got)
            by_id = {bid: prefix for prefix, bid in model.cached.items()}
            for bid in got:
                assert bid in by_id, f"block {bid} was not referenced"
                assert by_id[bid] not in locked, f"locked block {bid} evicted"
                assert bid not in self.reported[i], f"block {bid} reported twice"
                self.reported[i].add(bid)
                del model.cached[by_id[bid]]
            self._assert_prefix_closed(model)
            results.append(got)
        assert results[0] == results[1]

    @rule()
    def evict_everything(self) -> None:
        for i, (index, model) in enumerate(zip(self.indexes, self.models)):
            got = index.evict(10**9)
            locked = model.locked_prefixes()
            assert set(model.cached) - locked == {
                p for p, bid in model.cached.items() if bid in got
            }
            for prefix in list(model.cached):
                if prefix not in locked:
                    del model.cached[prefix]
            self.reported[i].update(got)
            for m, key, blocks in model.locks:  # every locked path is still served
                assert index.match([t for b in blocks for t in b], key).block_ids == m.block_ids

    @rule()
    def clear(self) -> None:
        for i, (index, model) in enumerate(zip(self.indexes, self.models)):
            got = index.clear()
            locked = model.locked_prefixes()
            expected = {bid for p, bid in model.cached.items() if p not in locked}
            assert sorted(got) == sorted(expected)
            model.cached = {p: b for p, b in model.cached.items() if p in locked}
            self.reported[i].update(got)

    @staticmethod
    def _assert_prefix_closed(model: Model) -> None:
        for key, blocks in model.cached:
            if len(blocks) > 1:
                assert (key, blocks[:-1]) in model.cached, "a parent was evicted before its child"

    @invariant()
    def consistent(self) -> None:
        for index, model in zip(self.indexes, self.models):
            index._debug_check()
            assert index.num_cached_blocks == len(model.cached)
            assert {b for e in index.entries() for b in e.kv_block_ids} == set(
                model.cached.values()
            )


PrefixIndexMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPrefixIndexMachine = PrefixIndexMachine.TestCase
