"""Behaviour both indexes share, with exact block ids and eviction orders (block size 4)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sagellm.core.errors import ConfigError, SageLLMError
from sagellm.core.protocols import PrefixIndex
from sagellm.core.types import PrefixMatch
from sagellm.prefix_cache import (
    BlockHashPrefixIndex,
    PrefixLockError,
    RadixPrefixIndex,
    StalePrefixMatchError,
)

Factory = Callable[..., RadixPrefixIndex | BlockHashPrefixIndex]

A = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # three blocks
B = [1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23, 24, 25, 26, 27]  # shares two blocks with A
C = [30, 31, 32, 33, 34, 35, 36, 37]  # unrelated


@pytest.fixture(params=["radix", "block_hash"])
def make(request: pytest.FixtureRequest) -> Factory:
    cls = RadixPrefixIndex if request.param == "radix" else BlockHashPrefixIndex

    def factory(**context: object) -> RadixPrefixIndex | BlockHashPrefixIndex:
        context.setdefault("block_size", 4)
        return cls(**context)  # type: ignore[arg-type]

    return factory


def check(index: RadixPrefixIndex | BlockHashPrefixIndex) -> None:
    index._debug_check()


def test_satisfies_the_protocol(make: Factory) -> None:
    index = make()
    assert isinstance(index, PrefixIndex)
    assert index.block_size == 4
    assert index.num_cached_blocks == 0
    assert list(index.entries()) == []


def test_insert_returns_new_blocks_and_match_reports_full_blocks(make: Factory) -> None:
    index = make()
    assert index.insert(A + [13], [100, 101, 102, 103]) == [100, 101, 102]  # 103 is partial
    assert index.num_cached_blocks == 3
    m = index.match(A + [13, 14])
    assert (m.block_ids, m.num_tokens, m.num_query_tokens) == ((100, 101, 102), 12, 14)
    assert m.remaining_tokens == 2 and m.hit
    m = index.match([1, 2, 3, 4, 5, 6, 7])  # the second block is incomplete
    assert (m.block_ids, m.num_tokens, m.num_query_tokens) == ((100,), 4, 7)
    m = index.match([1, 2, 3])
    assert (m.block_ids, m.num_tokens, m.handle) == ((), 0, None)
    m = index.match([1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12])  # diverges inside block 2
    assert m.block_ids == (100,)
    check(index)


def test_insert_shares_the_cached_prefix(make: Factory) -> None:
    index = make()
    index.insert(A, [100, 101, 102])
    # the first two blocks are cached: the caller keeps 200 and 201, the index takes 202, 203
    assert index.insert(B, [200, 201, 202, 203]) == [202, 203]
    assert index.num_cached_blocks == 5
    assert index.match(B).block_ids == (100, 101, 202, 203)
    assert index.match(A).block_ids == (100, 101, 102)
    # re-inserting a cached sequence takes nothing
    assert index.insert(A, [300, 301, 302]) == []
    assert index.match(A).block_ids == (100, 101, 102)
    check(index)


def test_lru_eviction_is_leaf_first_deepest_block_first(make: Factory) -> None:
    index = make()
    index.insert(A, [100, 101, 102])  # t1
    index.insert(C, [300, 301])  # t2
    index.insert(B, [200, 201, 202, 203])  # t3
    index.match(A)  # t4: A's leaf is now the most recent
    # leaves by last access: C (t2), B's tail (t3), A's tail (t4)
    assert index.evict(1) == [301]
    assert index.evict(2) == [300, 203]
    assert index.evict(2) == [202, 102]
    # the shared blocks became a leaf after both tails went
    assert index.evict(10) == [101, 100]
    assert index.num_cached_blocks == 0
    assert index.evict(1) == []
    assert list(index.entries()) == []
    check(index)


def test_a_parent_whose_children_are_gone_keeps_their_recency(make: Factory) -> None:
    index = make()
    index.insert(A, [100, 101, 102])  # t1
    index.insert(C, [300, 301])  # t2
    m = index.match(C)  # t3
    index.lock(m)
    index.insert(B, [200, 201, 202, 203])  # t4
    index.match(A)  # t5
    assert index.evict(3) == [203, 202, 102]
    # blocks 100/101 form a leaf whose last use was t5 (through A); C (t3) is older
    index.unlock(m)
    assert index.evict(2) == [301, 300]
    assert index.evict(2) == [101, 100]
    check(index)


def test_locked_paths_survive_eviction_and_clear(make: Factory) -> None:
    index = make()
    index.insert(A, [100, 101, 102])
    index.insert(B, [200, 201, 202, 203])
    m = index.match(B)
    index.lock(m)
    index.lock(m)  # locks nest
    assert index.evict(100) == [102]
    assert index.num_cached_blocks == 4
    index.unlock(m)
    assert index.evict(100) == []
    assert index.clear() == []
    index.unlock(m)
    assert index.evict(100) == [203, 202, 101, 100]
    check(index)


def test_locking_a_prefix_protects_its_ancestors_only(make: Factory) -> None:
    index = make()
    index.insert(A, [100, 101, 102])
    index.insert(B, [200, 201, 202, 203])
    m = index.match([1, 2, 3, 4, 5, 6, 7, 8])  # the shared two blocks
    assert m.block_ids == (100, 101)
    index.lock(m)
    assert sorted(index.evict(100)) == [102, 202, 203]
    assert index.match(B).block_ids == (100, 101)
    index.unlock(m)
    check(index)


def test_clear_drops_unlocked_entries(make: Factory) -> None:
    index = make()
    index.insert(A, [100, 101, 102])
    index.insert(C, [300, 301])
    m = index.match(C)
    index.lock(m)
    assert sorted(index.clear()) == [100, 101, 102]
    assert index.num_cached_blocks == 2
    assert index.match(A).num_tokens == 0
    assert index.match(C).block_ids == (300, 301)
    index.unlock(m)
    assert sorted(index.clear()) == [300, 301]
    assert index.num_cached_blocks == 0
    check(index)


def test_lock_of_a_miss_is_a_no_op(make: Factory) -> None:
    index = make()
    miss = index.match([1, 2, 3, 4])
    index.lock(miss)
    index.unlock(miss)
    assert index.num_cached_blocks == 0


def test_unlock_without_lock_raises(make: Factory) -> None:
    index = make()
    index.insert(A, [100, 101, 102])
    m = index.match(A)
    with pytest.raises(PrefixLockError, match="not locked; call unlock\\(\\) once per lock\\(\\)"):
        index.unlock(m)
    index.lock(m)
    index.unlock(m)
    with pytest.raises(PrefixLockError):
        index.unlock(m)


def test_a_match_evicted_before_lock_is_stale(make: Factory) -> None:
    index = make()
    index.insert(A, [100, 101, 102])
    m = index.match(A)
    assert index.evict(1) == [102]
    with pytest.raises(StalePrefixMatchError, match="stale: its 12 tokens are no longer"):
        index.lock(m)
    assert isinstance(StalePrefixMatchError("x"), SageLLMError)
    m2 = index.match(A)
    index.clear()
    with pytest.raises(StalePrefixMatchError):
        index.lock(m2)


def test_a_match_from_another_index_is_refused(make: Factory) -> None:
    one, other = make(), make()
    one.insert(A, [100, 101, 102])
    other.insert(A, [100, 101, 102])
    with pytest.raises(StalePrefixMatchError, match="another prefix index"):
        other.lock(one.match(A))
    forged = PrefixMatch((100,), 4, 4, handle=None)
    with pytest.raises(StalePrefixMatchError, match="no handle"):
        one.lock(forged)


def test_insert_validates_its_input(make: Factory) -> None:
    index = make()
    with pytest.raises(ValueError, match="insert got 2 block ids for 3 full blocks of 12 tokens"):
        index.insert(A, [100, 101])
    index.insert(A, [100, 101, 102])
    with pytest.raises(ValueError, match="block 102 is already referenced by this prefix index"):
        index.insert(C, [102, 103])
    with pytest.raises(ValueError, match="block 7 appears twice"):
        index.insert(C, [7, 7])
    with pytest.raises(ValueError, match="isolation_key must be a str"):
        index.match(A, isolation_key=3)  # type: ignore[arg-type]
    assert index.insert([1, 2], []) == []  # no full block: nothing to record
    assert index.num_cached_blocks == 3
    check(index)


def test_evict_validates_its_input(make: Factory) -> None:
    index = make()
    with pytest.raises(ValueError, match="num_blocks must be a non-negative int, got -1"):
        index.evict(-1)
    assert index.evict(0) == []


def test_construction_errors(make: Factory) -> None:
    with pytest.raises(ConfigError, match="block_size must be a positive int .* got 0"):
        make(block_size=0)
    with pytest.raises(ConfigError, match="eviction_policy must implement"):
        make(eviction_policy=object())
    with pytest.raises(TypeError):
        make(unknown_context=1)


def test_stats_count_and_reset(make: Factory) -> None:
    index = make()
    index.insert(A, [100, 101, 102])
    index.match(A + [13])  # 12 of 13
    index.match(C)  # 0 of 8
    index.match([1, 2, 3, 4, 9])  # 4 of 5
    index.evict(2)
    stats = index.make_stats()
    assert stats.num_lookups == 3
    assert stats.num_hits == 2
    assert stats.num_query_tokens == 26
    assert stats.num_matched_tokens == 16
    assert stats.hit_rate == pytest.approx(16 / 26)
    assert stats.num_evicted_blocks == 2
    assert stats.num_cached_blocks == 1
    assert 0 < stats.lookup_p50_us <= stats.lookup_p99_us
    again = index.make_stats()
    assert (again.num_lookups, again.num_hits, again.num_evicted_blocks) == (0, 0, 0)
    assert (again.lookup_p50_us, again.lookup_p99_us) == (0.0, 0.0)
    assert again.num_cached_blocks == 1  # a gauge is not reset


def test_entries_describe_whole_prefixes(make: Factory) -> None:
    index = make()
    index.insert(A, [100, 101, 102])
    index.insert(B, [200, 201, 202, 203])
    index.insert(C, [300, 301], isolation_key="t1")
    entries = list(index.entries())
    paths = {(e.isolation_key, e.kv_block_ids) for e in entries}
    assert ("", (100, 101, 102)) in paths
    assert ("", (100, 101, 202, 203)) in paths
    assert ("t1", (300, 301)) in paths
    for e in entries:
        assert len(e.kv_block_ids) * 4 == e.token_length
    assert len({e.entry_id for e in entries}) == len(entries)
    assert len({e.token_hash for e in entries}) == len(entries)
