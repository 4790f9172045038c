"""Isolation keys (tenant + cache salt) partition the cache: no lookup crosses keys."""

from __future__ import annotations

import random

import pytest

from sagellm.core.types import GenerationRequest
from sagellm.prefix_cache import BlockHashPrefixIndex, RadixPrefixIndex

SECRET = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]


def key(tenant: str = "", salt: str = "") -> str:
    return GenerationRequest(
        request_id="r", prompt_token_ids=(1,), tenant=tenant, cache_salt=salt
    ).isolation_key


@pytest.fixture(params=[RadixPrefixIndex, BlockHashPrefixIndex])
def cls(request: pytest.FixtureRequest) -> type:
    return request.param  # type: ignore[no-any-return]


def test_keys_from_requests_are_distinct() -> None:
    assert key() == ""
    assert len({key(), key("alice"), key("", "alice"), key("alice", "s1"), key("bob")}) == 5


def test_lookups_never_match_another_keys_prefixes(cls: type) -> None:
    index = cls(block_size=4)
    alice, bob, salted = key("alice"), key("bob"), key("alice", "s1")
    assert index.insert(SECRET, [100, 101, 102, 103], alice) == [100, 101, 102, 103]
    for other in ("", bob, salted, key("", "alice")):
        m = index.match(SECRET, other)
        assert (m.num_tokens, m.block_ids, m.handle) == (0, (), None)
    assert index.match(SECRET, alice).block_ids == (100, 101, 102, 103)
    # the same tokens under another key take that key's own blocks: nothing is shared
    assert index.insert(SECRET, [200, 201, 202, 203], bob) == [200, 201, 202, 203]
    assert index.match(SECRET, bob).block_ids == (200, 201, 202, 203)
    assert index.match(SECRET, alice).block_ids == (100, 101, 102, 103)
    assert index.num_cached_blocks == 8
    keys = {e.isolation_key for e in index.entries()}
    assert keys == {alice, bob}
    index._debug_check()


def test_probing_another_tenants_prompt_reveals_nothing(cls: type) -> None:
    """A timing-probe attacker guesses a victim's prompt block by block.

    With a shared cache, the guess that extends the matched prefix would hit (and be
    faster); here every guess, including the exact secret, is a miss for the attacker,
    and the probes do not refresh the victim's entries either (no eviction side channel).
    """
    index = cls(block_size=4)
    victim, attacker = key("victim"), key("attacker")
    index.insert(SECRET, [100, 101, 102, 103], victim)  # t1: older victim entry
    index.insert([90, 91, 92, 93], [900], victim)  # t2: newer victim entry
    rng = random.Random(0)
    known: list[int] = []
    for block in range(4):
        for guess in [SECRET[4 * block : 4 * block + 4]] + [
            [rng.randrange(100) for _ in range(4)] for _ in range(20)
        ]:
            m = index.match(known + guess, attacker)
            assert (m.num_tokens, m.block_ids, m.handle) == (0, (), None)
        known += SECRET[4 * block : 4 * block + 4]
    stats = index.make_stats()
    assert stats.num_hits == 0 and stats.num_matched_tokens == 0
    # the victim's LRU order is untouched by the probes: its older entry goes first
    assert index.evict(1) == [103]
    assert index.match(SECRET[:12], victim).block_ids == (100, 101, 102)


def test_eviction_and_locks_span_keys_but_never_mix_blocks(cls: type) -> None:
    index = cls(block_size=4)
    index.insert(SECRET, [100, 101, 102, 103], "a")  # t1
    index.insert(SECRET, [200, 201, 202, 203], "b")  # t2
    m = index.match(SECRET, "a")  # t3
    index.lock(m)
    assert index.evict(3) == [203, 202, 201]
    index.unlock(m)
    assert index.evict(10) == [200, 103, 102, 101, 100]
    assert list(index.entries()) == []
    index._debug_check()
