"""Block-hash specifics: chained hashes, collisions ruled out by stored tokens, sha256."""

from __future__ import annotations

from sagellm.prefix_cache import BlockHashPrefixIndex, BlockHashPrefixIndexConfig
from sagellm.prefix_cache.hashing import ROOT_HASH, builtin_block_hash, sha256_block_hash

A = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def constant_hash(parent: int, block: tuple[int, ...], key: str) -> int:
    return 7  # every block collides with every other


def first_token_hash(parent: int, block: tuple[int, ...], key: str) -> int:
    return hash((parent, block[0]))  # blocks that share their first token collide


def test_entries_carry_the_chained_hash() -> None:
    index = BlockHashPrefixIndex(block_size=4)
    index.insert(A, [100, 101, 102], isolation_key="k")
    entries = list(index.entries())
    h = ROOT_HASH
    expected = []
    for i in range(3):
        h = builtin_block_hash(h, tuple(A[4 * i : 4 * i + 4]), "k")
        expected.append((h, 4 * (i + 1), tuple([100, 101, 102][: i + 1])))
    assert [(e.token_hash, e.token_length, e.kv_block_ids) for e in entries] == expected


def test_a_colliding_hash_is_a_miss_not_a_wrong_prefix() -> None:
    index = BlockHashPrefixIndex(block_size=4, hash_function=first_token_hash)
    assert index.insert([1, 2, 3, 4], [100]) == [100]
    # [1, 9, 9, 9] hashes like [1, 2, 3, 4] but holds other tokens
    m = index.match([1, 9, 9, 9])
    assert (m.num_tokens, m.block_ids) == (0, ())
    assert index.num_collisions == 1
    # it cannot be cached either: its slot is taken; the caller keeps its block
    assert index.insert([1, 9, 9, 9], [200]) == []
    assert index.match([1, 2, 3, 4]).block_ids == (100,)
    index._debug_check()


def test_collision_on_a_deeper_block_stops_the_chain() -> None:
    index = BlockHashPrefixIndex(block_size=2, hash_function=first_token_hash)
    assert index.insert([1, 1, 2, 2, 3, 3], [10, 11, 12]) == [10, 11, 12]
    # second block [2, 9] collides with [2, 2] under the same parent
    assert index.insert([1, 1, 2, 9, 4, 4], [20, 21, 22]) == []
    m = index.match([1, 1, 2, 9, 4, 4])
    assert m.block_ids == (10,)
    index._debug_check()


def test_constant_hash_keeps_results_correct() -> None:
    index = BlockHashPrefixIndex(block_size=4, hash_function=constant_hash)
    # the second block collides with the first block's hash: only one block is cached
    assert index.insert(A, [100, 101, 102]) == [100]
    assert index.match(A).block_ids == (100,)
    assert index.match([9, 9, 9, 9]).num_tokens == 0
    assert index.match([5, 6, 7, 8]).num_tokens == 0  # same hash, other tokens and parent
    assert index.evict(5) == [100]
    index._debug_check()


def test_parent_is_checked_not_only_tokens() -> None:
    # a hash that ignores the parent makes equal blocks at different depths collide
    def no_parent(parent: int, block: tuple[int, ...], key: str) -> int:
        return hash(block)

    index = BlockHashPrefixIndex(block_size=2, hash_function=no_parent)
    assert index.insert([1, 1, 2, 2], [10, 11]) == [10, 11]
    # [2, 2] as a first block has the hash of the cached second block, whose parent differs
    m = index.match([2, 2, 1, 1])
    assert m.num_tokens == 0
    index._debug_check()


def test_sha256_is_stable_and_separates_keys() -> None:
    h1 = sha256_block_hash(ROOT_HASH, (1, 2, 3, 4), "")
    assert h1 == sha256_block_hash(0, (1, 2, 3, 4), "")
    assert h1 != sha256_block_hash(0, (1, 2, 3, 4), "tenant")
    assert h1 != sha256_block_hash(1, (1, 2, 3, 4), "")
    assert 0 <= h1 < 2**64
    index = BlockHashPrefixIndex(BlockHashPrefixIndexConfig(hash_algorithm="sha256"), block_size=4)
    index.insert(A, [100, 101, 102])
    assert [e.token_hash for e in index.entries()][0] == h1
    assert index.match(A).block_ids == (100, 101, 102)
