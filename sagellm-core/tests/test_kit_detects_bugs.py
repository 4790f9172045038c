"""The conformance suites fail for implementations that break their protocol.

Each case takes a reference implementation, breaks one rule, and checks that the suite
test guarding that rule raises AssertionError (the tests of the kit can fail).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from core_reference import (
    CountingPredictor,
    DictPrefixIndex,
    FCFSConfig,
    FCFSScheduler,
    ListKVPool,
    ListPoolConfig,
    LRUPolicy,
)
from hypothesis import Phase, settings

from sagellm.core.testing import (
    EvictionPolicyConformance,
    KVPoolConformance,
    LifetimePredictorConformance,
    PrefixIndexConformance,
    SchedulerConformance,
)
from sagellm.core.types import (
    EvictionDecision,
    KVCacheSchema,
    LifetimePrediction,
    PolicyContext,
    PrefixMatch,
    SchedulerOutput,
)

settings.register_profile(
    "sagellm-core-no-shrink",
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    database=None,
    derandomize=True,
)


@pytest.fixture(autouse=True)
def _no_shrinking() -> Iterator[None]:
    """A failure is all these tests need: skip hypothesis's (slow) shrinking of it."""
    previous = settings.get_current_profile_name()
    settings.load_profile("sagellm-core-no-shrink")
    yield
    settings.load_profile(previous)


def _fails(suite: type, method: str) -> None:
    """Run one suite test; it must fail with an assertion (or pytest.fail / raises)."""
    try:
        getattr(suite(), method)()
    except (AssertionError, pytest.fail.Exception):
        return
    except Exception as exc:  # hypothesis groups several distinct failures
        if any(isinstance(e, AssertionError) for e in getattr(exc, "exceptions", ())):
            return
        raise
    pytest.fail(f"{method} passed a broken implementation")


# --------------------------------------------------------------------------- KV pool


class ReusesFreedBlockEarly(ListKVPool):
    """Puts a block back on the free list when one of several references is dropped."""

    def free(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            if self._ref[b] > 1 and b not in self._free:
                self._free.append(b)
        super().free(block_ids)


class PartialAllocation(ListKVPool):
    """Hands out what is left instead of returning None."""

    def allocate(self, num_blocks: int) -> list[int] | None:
        return super().allocate(min(num_blocks, self.num_free_blocks))


class SilentDoubleFree(ListKVPool):
    def free(self, block_ids: Sequence[int]) -> None:
        super().free([b for b in block_ids if self._ref[b] > 0])


class NoCopy(ListKVPool):
    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        pass


def _pool_suite(cls: type[ListKVPool]) -> type:
    class Suite(KVPoolConformance):
        max_examples = 60

        def make_pool(self, schema: KVCacheSchema, num_blocks: int) -> ListKVPool:
            return cls(ListPoolConfig(num_blocks=num_blocks), schema=schema)

    return Suite


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (ReusesFreedBlockEarly, "test_never_hands_out_a_block_twice"),
        (PartialAllocation, "test_allocate_returns_none_when_short_and_changes_nothing"),
        (SilentDoubleFree, "test_free_of_a_free_block_raises_and_changes_nothing"),
        (NoCopy, "test_copy_blocks_copies_content"),
    ],
)
def test_kv_pool_suite_catches(cls: type[ListKVPool], method: str) -> None:
    if method == "test_copy_blocks_copies_content":
        pytest.importorskip("torch")
    _fails(_pool_suite(cls), method)


# --------------------------------------------------------------------------- prefix index


class IgnoresIsolation(DictPrefixIndex):
    def match(self, token_ids: Sequence[int], isolation_key: str = "") -> PrefixMatch:
        return super().match(token_ids, "")

    def insert(
        self, token_ids: Sequence[int], block_ids: Sequence[int], isolation_key: str = ""
    ) -> list[int]:
        return super().insert(token_ids, block_ids, "")


class EvictsLocked(DictPrefixIndex):
    def lock(self, match: PrefixMatch) -> None:
        pass

    def unlock(self, match: PrefixMatch) -> None:
        pass


class MatchesPartialBlocks(DictPrefixIndex):
    def match(self, token_ids: Sequence[int], isolation_key: str = "") -> PrefixMatch:
        m = super().match(token_ids, isolation_key)
        extra = min(len(token_ids) - m.num_tokens, 1) if m.hit else 0
        return PrefixMatch(m.block_ids, m.num_tokens + extra, m.num_query_tokens, m.handle)


class EvictsTooMany(DictPrefixIndex):
    def evict(self, num_blocks: int) -> list[int]:
        return super().evict(num_blocks + 1 if num_blocks else 0)


def _index_suite(cls: type[DictPrefixIndex]) -> type:
    class Suite(PrefixIndexConformance):
        max_examples = 100

        def make_index(self, block_size: int) -> DictPrefixIndex:
            return cls(block_size=block_size)

    return Suite


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (IgnoresIsolation, "test_isolation_keys_never_share"),
        (IgnoresIsolation, "test_random_operations_agree_with_a_model"),
        (EvictsLocked, "test_locked_blocks_are_never_evicted"),
        (MatchesPartialBlocks, "test_match_never_reports_more_than_given"),
        (EvictsTooMany, "test_evict_takes_leaves_first_and_at_most_n"),
        (EvictsTooMany, "test_random_operations_agree_with_a_model"),
    ],
)
def test_prefix_index_suite_catches(cls: type[DictPrefixIndex], method: str) -> None:
    _fails(_index_suite(cls), method)


# --------------------------------------------------------------------------- eviction


class EvictsPinned(LRUPolicy):
    def pin(self, key: Any) -> None:
        pass

    def unpin(self, key: Any) -> None:
        pass


class KeepsVictims(LRUPolicy):
    def evict(self, num: int, context: PolicyContext | None = None) -> EvictionDecision:
        victims = tuple(k for k in self._order if k not in self._pins)[:num]
        return EvictionDecision(victims)


class ReturnsOneAtMost(LRUPolicy):
    def evict(self, num: int, context: PolicyContext | None = None) -> EvictionDecision:
        return super().evict(min(num, 1), context)


def _policy_suite(cls: type[LRUPolicy]) -> type:
    class Suite(EvictionPolicyConformance):
        max_examples = 100

        def make_policy(self, capacity: int) -> LRUPolicy:
            return cls(capacity=capacity)

    return Suite


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (EvictsPinned, "test_pinned_keys_are_never_victims"),
        (EvictsPinned, "test_random_operations_keep_the_contract"),
        (KeepsVictims, "test_evict_returns_held_keys_and_forgets_them"),
        (KeepsVictims, "test_random_operations_keep_the_contract"),
        (ReturnsOneAtMost, "test_random_operations_keep_the_contract"),
    ],
)
def test_eviction_suite_catches(cls: type[LRUPolicy], method: str) -> None:
    _fails(_policy_suite(cls), method)


# --------------------------------------------------------------------------- lifetime


class OverconfidentPredictor(CountingPredictor):
    def predict(self, features: Any) -> LifetimePrediction:
        p = super().predict(features)
        return LifetimePrediction(p.reuse_probability * 3, p.ttl_seconds, p.ttl_bucket)


class NoisyPredictor(CountingPredictor):
    def __init__(self) -> None:
        super().__init__()
        self._n = 0

    def predict(self, features: Any) -> LifetimePrediction:
        self._n += 1
        return LifetimePrediction(0.5, float(self._n), 0)


def _predictor_suite(factory: Callable[[], CountingPredictor]) -> type:
    class Suite(LifetimePredictorConformance):
        def make_predictor(self) -> CountingPredictor:
            return factory()

    return Suite


def test_lifetime_suite_catches_out_of_range_probability() -> None:
    _fails(_predictor_suite(OverconfidentPredictor), "test_random_histories_give_valid_predictions")


def test_lifetime_suite_catches_nondeterminism() -> None:
    _fails(_predictor_suite(NoisyPredictor), "test_prediction_is_deterministic_for_the_same_state")


# --------------------------------------------------------------------------- scheduler


class IgnoresBudget(FCFSScheduler):
    def __init__(self, config: FCFSConfig, **kw: Any) -> None:
        super().__init__(config.model_copy(update={"max_num_batched_tokens": 10_000}), **kw)


class IgnoresSeqCap(FCFSScheduler):
    def __init__(self, config: FCFSConfig, **kw: Any) -> None:
        super().__init__(config.model_copy(update={"max_num_seqs": 100}), **kw)


class LeaksOnAbort(FCFSScheduler):
    def _release(self, r: Any) -> None:
        r.block_ids = []
        r.num_computed = 0


class SkipsATokenAfterPreemption(FCFSScheduler):
    def schedule(self) -> SchedulerOutput:
        out = super().schedule()
        for rid in out.preempted_request_ids:
            r = self._find(rid)
            if r is not None:
                r.num_computed = 1  # pretends the first token's KV survived
        return out


class AcceptsLongPrompts(FCFSScheduler):
    def add_request(self, request: Any) -> None:
        from core_reference import _Req

        self.waiting.append(_Req(request))


def _scheduler_suite(cls: type[FCFSScheduler]) -> type:
    class Suite(SchedulerConformance):
        max_examples = 30

        def make_pool(self, num_blocks: int, block_size: int) -> ListKVPool:
            schema = KVCacheSchema(num_layers=1, num_kv_heads=1, head_dim=4, block_size=block_size)
            return ListKVPool(ListPoolConfig(num_blocks=num_blocks), schema=schema)

        def make_scheduler(
            self, pool: Any, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int
        ) -> FCFSScheduler:
            config = FCFSConfig(
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
            )
            return cls(config, kv_pool=pool, max_model_len=max_model_len)

    return Suite


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (IgnoresBudget, "test_token_budget_and_sequence_cap_are_respected"),
        (IgnoresSeqCap, "test_token_budget_and_sequence_cap_are_respected"),
        (LeaksOnAbort, "test_abort_frees_blocks"),
        (LeaksOnAbort, "test_one_request_completes"),
        (SkipsATokenAfterPreemption, "test_preemption_in_a_tiny_pool_still_completes_everything"),
        (AcceptsLongPrompts, "test_too_long_prompt_raises"),
    ],
)
def test_scheduler_suite_catches(cls: type[FCFSScheduler], method: str) -> None:
    _fails(_scheduler_suite(cls), method)


def test_unimplemented_factories_say_what_to_write() -> None:
    with pytest.raises(
        NotImplementedError, match=r"must implement make_pool\(schema, num_blocks\)"
    ):
        KVPoolConformance().test_is_kv_pool()
    with pytest.raises(NotImplementedError, match=r"make_scheduler\(pool, max_model_len"):
        SchedulerConformance().make_scheduler(None, 16, 1, 16)
