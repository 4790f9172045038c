"""Conformance suite of :class:`sagellm.core.protocols.KVPool`."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sagellm.core.protocols import KVPool
from sagellm.core.telemetry import KVPoolStats
from sagellm.core.testing._common import suite_settings
from sagellm.core.types import KVBlockInfo, KVCacheSchema

__all__ = ["KVPoolConformance"]


class KVPoolConformance:
    """Behaviour every KV pool shares. Subclass it and implement :meth:`make_pool`.

    ``make_pool(schema, num_blocks)`` returns a fresh pool of exactly ``num_blocks``
    blocks laid out by ``schema``, on the CPU. Tests that read storage import torch and
    are skipped when it is missing. Set the class attribute ``schema`` to run the suite on
    another layout, e.g. a quantized one (``dtype="int8", scale_bytes=2``: every
    token-head row holds ``head_dim`` values and then its scale).
    """

    #: Layout of the pools the suite builds.
    schema: ClassVar[KVCacheSchema] = KVCacheSchema(
        num_layers=2, num_kv_heads=2, head_dim=8, block_size=4
    )
    #: Blocks of the pools the suite builds.
    num_blocks: ClassVar[int] = 8
    #: Hypothesis examples of the property tests.
    max_examples: ClassVar[int] = 40

    def make_pool(self, schema: KVCacheSchema, num_blocks: int) -> Any:
        """A fresh pool of ``num_blocks`` blocks with ``schema`` (override this)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement make_pool(schema, num_blocks)"
        )

    def _pool(self, num_blocks: int | None = None) -> Any:
        return self.make_pool(self.schema, self.num_blocks if num_blocks is None else num_blocks)

    @staticmethod
    def _refs(pool: Any) -> list[int]:
        return [pool.ref_count(b) for b in range(pool.num_blocks)]

    # ------------------------------------------------------------------ shape

    def test_is_kv_pool(self) -> None:
        pool = self._pool()
        assert isinstance(pool, KVPool)
        assert pool.schema == self.schema
        assert pool.num_blocks == self.num_blocks
        assert pool.num_free_blocks == self.num_blocks
        assert self._refs(pool) == [0] * self.num_blocks

    # ------------------------------------------------------------------ allocate

    def test_allocate_hands_out_distinct_blocks_with_one_reference(self) -> None:
        pool = self._pool()
        first = pool.allocate(3)
        assert isinstance(first, list) and len(first) == 3
        second = pool.allocate(self.num_blocks - 3)
        assert isinstance(second, list) and len(second) == self.num_blocks - 3
        every = first + second
        assert sorted(every) == list(range(self.num_blocks))
        assert all(pool.ref_count(b) == 1 for b in every)
        assert pool.num_free_blocks == 0

    def test_allocate_zero_returns_empty_list(self) -> None:
        pool = self._pool()
        assert pool.allocate(0) == []
        assert pool.num_free_blocks == self.num_blocks

    def test_allocate_negative_raises_value_error(self) -> None:
        pool = self._pool()
        with pytest.raises(ValueError):
            pool.allocate(-1)
        assert pool.num_free_blocks == self.num_blocks

    def test_allocate_returns_none_when_short_and_changes_nothing(self) -> None:
        pool = self._pool()
        held = pool.allocate(self.num_blocks - 1)
        assert held is not None
        refs = self._refs(pool)
        assert pool.can_allocate(1) is True
        assert pool.can_allocate(2) is False
        assert pool.allocate(2) is None
        assert pool.num_free_blocks == 1
        assert self._refs(pool) == refs
        last = pool.allocate(1)
        assert last is not None and len(last) == 1 and last[0] not in held
        assert pool.allocate(1) is None
        assert pool.num_free_blocks == 0

    def test_can_allocate_has_no_side_effect(self) -> None:
        pool = self._pool()
        for n in (0, 1, self.num_blocks, self.num_blocks + 1):
            assert pool.can_allocate(n) is (n <= self.num_blocks)
        assert pool.num_free_blocks == self.num_blocks
        assert self._refs(pool) == [0] * self.num_blocks

    # ------------------------------------------------------------------ share / free

    def test_free_returns_blocks_to_the_pool(self) -> None:
        pool = self._pool()
        ids = pool.allocate(self.num_blocks)
        assert ids is not None
        pool.free(ids[:2])
        assert pool.num_free_blocks == 2
        assert pool.ref_count(ids[0]) == 0 and pool.ref_count(ids[1]) == 0
        again = pool.allocate(2)
        assert again is not None and sorted(again) == sorted(ids[:2])

    def test_share_and_free_count_references(self) -> None:
        pool = self._pool()
        ids = pool.allocate(2)
        assert ids is not None
        a, b = ids
        pool.share([a])
        pool.share([a])
        assert pool.ref_count(a) == 3 and pool.ref_count(b) == 1
        pool.free([a])
        assert pool.ref_count(a) == 2
        assert pool.num_free_blocks == self.num_blocks - 2
        pool.free([a, b])
        assert pool.ref_count(a) == 1 and pool.ref_count(b) == 0
        assert pool.num_free_blocks == self.num_blocks - 1
        pool.free([a])
        assert pool.ref_count(a) == 0
        assert pool.num_free_blocks == self.num_blocks

    def test_free_of_a_free_block_raises_and_changes_nothing(self) -> None:
        pool = self._pool()
        ids = pool.allocate(3)
        assert ids is not None
        a, b, c = ids
        pool.free([a])
        refs = self._refs(pool)
        with pytest.raises(ValueError) as info:
            pool.free([b, a])
        assert str(a) in str(info.value)
        assert self._refs(pool) == refs
        assert pool.num_free_blocks == self.num_blocks - 2
        with pytest.raises(ValueError):
            pool.free([c, c])  # two references dropped, only one held
        assert self._refs(pool) == refs

    def test_share_of_a_free_block_raises(self) -> None:
        pool = self._pool()
        ids = pool.allocate(1)
        assert ids is not None
        free_block = next(b for b in range(self.num_blocks) if b not in ids)
        with pytest.raises(ValueError):
            pool.share([ids[0], free_block])
        assert pool.ref_count(free_block) == 0

    def test_block_info(self) -> None:
        pool = self._pool()
        ids = pool.allocate(1)
        assert ids is not None
        pool.share(ids)
        info = pool.block_info(ids[0])
        assert isinstance(info, KVBlockInfo)
        assert info.block_id == ids[0]
        assert info.ref_count == 2
        assert info.size_bytes > 0

    def test_never_hands_out_a_block_twice(self) -> None:
        """A hypothesis state machine over allocate, share and free against a model."""
        suite = self

        class PoolMachine(RuleBasedStateMachine):
            def __init__(self) -> None:
                super().__init__()
                self.pool = suite._pool()
                self.n = suite.num_blocks
                self.model: dict[int, int] = {}  # allocated block -> references

            @rule(k=st.integers(0, 6))
            def allocate(self, k: int) -> None:
                num_free = self.n - len(self.model)
                assert self.pool.can_allocate(k) is (k <= num_free)
                got = self.pool.allocate(k)
                if k > num_free:
                    assert got is None
                    return
                assert got is not None and len(got) == k and len(set(got)) == k
                for b in got:
                    assert 0 <= b < self.n
                    assert b not in self.model, f"block {b} handed out while still in use"
                    self.model[b] = 1

            @precondition(lambda self: bool(self.model))
            @rule(i=st.integers(0, 1 << 16))
            def share(self, i: int) -> None:
                b = sorted(self.model)[i % len(self.model)]
                self.pool.share([b])
                self.model[b] += 1

            @precondition(lambda self: bool(self.model))
            @rule(i=st.integers(0, 1 << 16), j=st.integers(0, 1 << 16))
            def free(self, i: int, j: int) -> None:
                held = sorted(self.model)
                picked = sorted({held[i % len(held)], held[j % len(held)]})
                self.pool.free(picked)
                for b in picked:
                    self.model[b] -= 1
                    if self.model[b] == 0:
                        del self.model[b]

            @rule(i=st.integers(0, 1 << 16))
            def free_of_a_free_block_raises(self, i: int) -> None:
                free = [b for b in range(self.n) if b not in self.model]
                if not free:
                    return
                with pytest.raises(ValueError):
                    self.pool.free([free[i % len(free)]])

            @invariant()
            def counts_match_the_model(self) -> None:
                assert self.pool.num_free_blocks == self.n - len(self.model)
                for b in range(self.n):
                    assert self.pool.ref_count(b) == self.model.get(b, 0)

        run_state_machine_as_test(
            PoolMachine,
            settings=suite_settings(self.max_examples, stateful_step_count=30),
        )

    # ------------------------------------------------------------------ storage

    def test_layer_cache_shapes_match_the_schema(self) -> None:
        torch = pytest.importorskip("torch")
        pool = self._pool()
        s = self.schema
        # a quantized row holds head_dim values, then the scale's elements
        shape = (self.num_blocks, s.block_size, s.num_kv_heads, s.head_size)
        for layer in range(s.num_layers):
            k, v = pool.layer_cache(layer)
            assert tuple(k.shape) == shape and tuple(v.shape) == shape
            assert k.dtype == getattr(torch, s.dtype) and v.dtype == getattr(torch, s.dtype)
            row_bytes = s.head_dim * k.element_size() + s.scale_bytes
            assert k.shape[-1] * k.element_size() == row_bytes

    def test_layer_cache_is_the_storage(self) -> None:
        torch = pytest.importorskip("torch")
        pool = self._pool()
        ids = pool.allocate(1)
        assert ids is not None
        k, v = pool.layer_cache(0)
        k[ids[0]].fill_(3.0)
        v[ids[0]].fill_(-2.0)
        k2, v2 = pool.layer_cache(0)
        assert torch.all(k2[ids[0]] == 3.0) and torch.all(v2[ids[0]] == -2.0)

    def test_copy_blocks_copies_content(self) -> None:
        torch = pytest.importorskip("torch")
        pool = self._pool()
        ids = pool.allocate(5)
        assert ids is not None
        a, b, c, d, untouched = ids
        gen = torch.Generator().manual_seed(0)
        before = {}
        index = torch.tensor(ids)
        for layer in range(self.schema.num_layers):
            for j, t in enumerate(pool.layer_cache(layer)):
                shape = (len(ids), *t.shape[1:])
                t[index] = torch.randn(shape, generator=gen).to(t.dtype)
                before[(layer, j)] = t.clone()
        pool.copy_blocks([(a, b), (c, d)])
        for layer in range(self.schema.num_layers):
            for j, t in enumerate(pool.layer_cache(layer)):
                old = before[(layer, j)]
                assert torch.equal(t[b], old[a]) and torch.equal(t[d], old[c])
                assert torch.equal(t[a], old[a]) and torch.equal(t[c], old[c])
                assert torch.equal(t[untouched], old[untouched])
        assert [pool.ref_count(x) for x in ids] == [1] * 5

    # ------------------------------------------------------------------ stats

    def test_make_stats_reports_and_resets_counters(self) -> None:
        pool = self._pool()
        kept = pool.allocate(3)
        dropped = pool.allocate(2)
        assert kept is not None and dropped is not None
        assert pool.allocate(self.num_blocks) is None
        pool.free(dropped)
        stats = pool.make_stats()
        assert isinstance(stats, KVPoolStats)
        n = self.num_blocks
        assert (stats.num_blocks, stats.num_used_blocks, stats.num_free_blocks) == (n, 3, n - 3)
        assert stats.utilization == pytest.approx(3 / n)
        assert (stats.num_allocations, stats.num_failed_allocations, stats.num_frees) == (2, 1, 2)
        again = pool.make_stats()
        assert (again.num_allocations, again.num_failed_allocations, again.num_frees) == (0, 0, 0)
        assert (again.num_used_blocks, again.num_free_blocks) == (3, n - 3)
