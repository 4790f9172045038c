"""Exact victim orders of every policy on hand-worked sequences."""

from __future__ import annotations

from typing import Any

from sagellm.eviction import (
    ARCPolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    SievePolicy,
)


def get(policy: Any, key: Any, capacity: int) -> tuple[bool, tuple[Any, ...]]:
    """libCacheSim's get loop: (hit, victims)."""
    if key in policy:
        policy.access(key)
        return True, ()
    victims: tuple[Any, ...] = ()
    if len(policy) >= capacity:
        victims = policy.evict(1).victims
    policy.insert(key)
    return False, victims


def test_lru_evicts_least_recent_first() -> None:
    policy = LRUPolicy()
    for k in "abc":
        policy.insert(k)
    policy.access("a")
    assert policy.evict(3).victims == ("b", "c", "a")


def test_lru_unpin_puts_the_key_at_the_recent_end() -> None:
    policy = LRUPolicy()
    for k in "abc":
        policy.insert(k)
    policy.pin("a")
    policy.access("b")
    policy.unpin("a")
    assert policy.evict(3).victims == ("c", "b", "a")


def test_fifo_ignores_hits_and_unpin_goes_to_the_tail() -> None:
    policy = FIFOPolicy()
    for k in "abcd":
        policy.insert(k)
    policy.access("a")
    policy.pin("b")
    policy.unpin("b")
    assert policy.evict(4).victims == ("a", "c", "d", "b")


def test_lfu_breaks_ties_by_who_reached_the_count_first() -> None:
    policy = LFUPolicy()
    for k in "abcd":
        policy.insert(k)
    for k in "caab":  # a=3, c=2 (reached 2 first), b=2, d=1
        policy.access(k)
    assert [policy.frequency(k) for k in "abcd"] == [3, 2, 2, 1]
    assert policy.evict(4).victims == ("d", "c", "b", "a")


def test_lfu_pinned_key_keeps_counting_and_rejoins_its_count() -> None:
    policy = LFUPolicy()
    for k in "abc":
        policy.insert(k)
    policy.pin("a")
    policy.access("a")
    policy.access("b")
    policy.unpin("a")  # a and b both at 2; b got there first
    assert policy.evict(3).victims == ("c", "b", "a")


def test_lfu_reinserted_key_starts_at_one() -> None:
    policy = LFUPolicy()
    policy.insert("a")
    policy.access("a")
    policy.access("a")
    policy.insert("b")
    assert policy.evict(1).victims == ("b",)
    policy.remove("a")
    policy.insert("a")
    assert policy.frequency("a") == 1


def test_sieve_hand_skips_visited_keys_and_remembers_its_place() -> None:
    policy = SievePolicy()
    for k in "abcd":
        policy.insert(k)
    policy.access("a")
    policy.access("b")
    assert policy.queue() == ["d", "c", "b", "a"]
    # from the oldest: a and b are visited (bits cleared), c is the victim
    assert policy.evict(1).victims == ("c",)
    assert policy.hand == "d"
    policy.insert("e")
    policy.access("a")
    # the hand goes on from d: d, then e (the newest) go; the hand falls off the head
    assert policy.evict(2).victims == ("d", "e")
    assert policy.hand is None
    # the next walk starts at the oldest again: a is visited again, b is not any more
    assert policy.evict(1).victims == ("b",)
    assert policy.queue() == ["a"]


def test_sieve_pin_moves_the_hand_and_unpin_inserts_at_the_head() -> None:
    policy = SievePolicy()
    for k in "abc":
        policy.insert(k)
    policy.access("a")
    assert policy.evict(1).victims == ("b",)
    assert policy.hand == "c"
    policy.pin("c")
    assert policy.hand is None
    policy.access("c")
    policy.unpin("c")
    assert policy.queue() == ["c", "a"]
    # a visited -> cleared; c visited -> cleared; wrap to a
    assert policy.evict(2).victims == ("a", "c")


def test_s3fifo_fill_up_then_small_to_main_promotion() -> None:
    policy = S3FIFOPolicy(capacity=10)  # small 1, main 9, ghost 9
    assert policy.sizes() == (1, 9, 9)
    for k in range(10):
        get(policy, k, 10)
    # before any eviction small keeps its share and the overflow fills main
    assert policy.small_keys() == [0]
    assert policy.main_keys() == list(range(1, 10))
    policy.access(0)
    policy.access(0)
    # 0 reached the threshold (2): it moves to main; main then holds 10 > 9 and
    # its oldest unused key goes
    assert get(policy, 10, 10) == (False, (1,))
    assert policy.main_keys() == [*range(2, 10), 0]
    assert policy.frequency(0) == 0
    assert policy.small_keys() == [10]


def test_s3fifo_ghost_hit_admits_to_main() -> None:
    policy = S3FIFOPolicy(capacity=10)
    for k in range(10):
        get(policy, k, 10)
    assert get(policy, 10, 10) == (False, (0,))  # 0 had no hit: small -> ghost
    assert policy.ghost_keys() == [0]
    assert get(policy, 11, 10) == (False, (10,))
    assert policy.ghost_keys() == [0, 10]
    # 0 returns: the lookup finds it in the ghost, the eviction consumes the ghost entry
    # (main holds 9, small has 11: small evicts), and 0 enters main
    assert get(policy, 0, 10) == (False, (11,))
    assert policy.ghost_keys() == [10, 11]
    assert policy.main_keys() == [*range(1, 10), 0]
    assert policy.small_keys() == []


def test_s3fifo_main_is_a_two_bit_clock() -> None:
    policy = S3FIFOPolicy(capacity=10)
    for k in range(10):
        get(policy, k, 10)
    policy.remove(0)  # small empty: main evicts
    policy.access(1)
    for _ in range(5):
        policy.access(2)
    assert policy.evict(1).victims == (3,)
    assert policy.main_keys() == [4, 5, 6, 7, 8, 9, 1, 2]
    assert (policy.frequency(1), policy.frequency(2)) == (0, 2)


def test_arc_adapts_p_on_ghost_hits() -> None:
    policy = ARCPolicy(capacity=2)
    assert get(policy, "a", 2) == (False, ())
    assert get(policy, "b", 2) == (False, ())
    assert get(policy, "a", 2) == (True, ())  # a: T1 -> T2
    # miss: |T1| + |B1| + 1 = 2 is not > 2, REPLACE: |T1| = 1 > p = 0, b -> B1
    assert get(policy, "c", 2) == (False, ("b",))
    assert policy.lists() == {"t1": ["c"], "t2": ["a"], "b1": ["b"], "b2": []}
    # B1 hit: p += max(|B2| / |B1|, 1) = 1; REPLACE: |T1| = 1 is not > p, a -> B2
    assert get(policy, "b", 2) == (False, ("a",))
    assert policy.p == 1.0
    assert policy.lists() == {"t1": ["c"], "t2": ["b"], "b1": [], "b2": ["a"]}
    # B2 hit: p -= max(|B1| / |B2|, 1) -> 0; REPLACE: |T1| = 1 > 0, c -> B1
    assert get(policy, "a", 2) == (False, ("c",))
    assert policy.p == 0.0
    assert policy.lists() == {"t1": [], "t2": ["b", "a"], "b1": ["c"], "b2": []}


def test_arc_miss_with_full_t1_evicts_without_ghost() -> None:
    policy = ARCPolicy(capacity=2)
    for k in "abc":
        get(policy, k, 2)
    # |T1| + |B1| + 1 = 3 > 2 with B1 empty: a leaves without a ghost entry
    assert policy.lists() == {"t1": ["b", "c"], "t2": [], "b1": [], "b2": []}


def test_arc_ghost_key_inserted_without_lookup_still_enters_t2() -> None:
    policy = ARCPolicy(capacity=2)
    for k in "aba":
        get(policy, k, 2)
    get(policy, "c", 2)  # b -> B1
    policy.remove("c")  # the owner makes room itself, and never asks about b
    policy.insert("b")
    assert policy.p == 1.0
    assert policy.lists()["t2"] == ["a", "b"]
