"""Radix-specific structure: edges of whole blocks, splits at block boundaries, trimming."""

from __future__ import annotations

from sagellm.prefix_cache import RadixPrefixIndex
from sagellm.prefix_cache.hashing import ROOT_HASH, builtin_block_hash

A = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
B = [1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23, 24, 25, 26, 27]


def shape(index: RadixPrefixIndex) -> list[tuple[int, int, tuple[int, ...]]]:
    return [(e.entry_id, e.token_length, e.kv_block_ids) for e in index.entries()]


def test_one_edge_per_insert_and_split_on_divergence() -> None:
    index = RadixPrefixIndex(block_size=4)
    index.insert(A, [100, 101, 102])
    assert shape(index) == [(1, 12, (100, 101, 102))]
    index.insert(B, [200, 201, 202, 203])
    # node 1 was split after two blocks: node 2 holds the shared blocks
    assert shape(index) == [
        (2, 8, (100, 101)),
        (1, 12, (100, 101, 102)),
        (3, 16, (100, 101, 202, 203)),
    ]
    root = index._roots[""]
    assert root.children is not None and list(root.children) == [(1, 2, 3, 4)]
    upper = root.children[(1, 2, 3, 4)]
    assert upper.children is not None
    assert sorted(upper.children) == [(9, 10, 11, 12), (20, 21, 22, 23)]
    assert upper.tokens == (1, 2, 3, 4, 5, 6, 7, 8)
    index._debug_check()


def test_a_match_ending_inside_an_edge_splits_it() -> None:
    index = RadixPrefixIndex(block_size=4)
    index.insert(A, [100, 101, 102])
    m = index.match([1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert m.block_ids == (100, 101) and m.num_tokens == 8
    assert shape(index) == [(2, 8, (100, 101)), (1, 12, (100, 101, 102))]
    # locking the match locks exactly the two matched blocks
    index.lock(m)
    assert index.evict(10) == [102]
    index.unlock(m)
    index._debug_check()


def test_split_keeps_locks_of_the_lower_part() -> None:
    index = RadixPrefixIndex(block_size=4)
    index.insert(A, [100, 101, 102])
    m = index.match(A)
    index.lock(m)
    index.insert(B, [200, 201, 202, 203])  # splits the locked edge
    assert index.lock_ref(m) == 1
    assert index.evict(10) == [203, 202]
    index.unlock(m)
    assert index.evict(10) == [102, 101, 100]
    index._debug_check()


def test_evicting_part_of_a_leaf_trims_its_tail() -> None:
    index = RadixPrefixIndex(block_size=4)
    index.insert(A, [100, 101, 102])
    assert index.evict(1) == [102]
    assert shape(index) == [(1, 8, (100, 101))]
    assert index.match(A).block_ids == (100, 101)
    # the trimmed leaf can grow again through a new child
    assert index.insert(A, [100, 101, 110]) == [110]
    assert shape(index) == [(1, 8, (100, 101)), (2, 12, (100, 101, 110))]
    index._debug_check()


def test_entry_hashes_equal_the_block_hash_chain() -> None:
    index = RadixPrefixIndex(block_size=4)
    index.insert(A, [100, 101, 102], isolation_key="k")
    (entry,) = index.entries()
    h = ROOT_HASH
    for i in range(0, 12, 4):
        h = builtin_block_hash(h, tuple(A[i : i + 4]), "k")
    assert entry.token_hash == h and entry.isolation_key == "k"


def test_trimmed_leaf_keeps_its_place_in_lru_order() -> None:
    index = RadixPrefixIndex(block_size=2)
    index.insert([1, 1, 2, 2, 3, 3], [10, 11, 12])  # t1
    index.insert([5, 5], [50])  # t2
    assert index.evict(1) == [12]
    assert index.evict(1) == [11]  # still the least recently used leaf
    index.match([5, 5])  # t3
    index.match([1, 1])  # t4
    assert index.evict(2) == [50, 10]


def test_only_the_uncached_tail_is_taken() -> None:
    index = RadixPrefixIndex(block_size=2)
    index.insert([1, 1, 2, 2], [10, 11])  # t1
    assert index.insert([1, 1, 3, 3], [20, 21]) == [21]  # block [1, 1] is cached as 10
    index.insert([5, 5], [50])  # t3
    index.match([1, 1, 2, 2])  # t4
    assert index.evict(1) == [21]
    assert index.evict(1) == [50]
    assert index.evict(2) == [11, 10]
