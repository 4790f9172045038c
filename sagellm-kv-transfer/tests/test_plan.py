"""Plan arithmetic and leases: properties (hypothesis) and exact cases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagellm.core.types import KVCacheSchema, TransferPlan
from sagellm.kv_transfer.leases import LeaseTable
from sagellm.kv_transfer.plan import (
    load_plan,
    matched_tokens,
    message_bytes,
    messages,
    wire_bytes,
)

ids = st.lists(st.integers(0, 10_000), min_size=0, max_size=40, unique=True)


@given(ids, st.integers(1, 5), st.integers(1, 9))
def test_messages_cover_every_layer_block_once_in_layer_order(src, layers, chunk) -> None:
    dst = [b + 7 for b in src]
    msgs = messages(layers, src, dst, chunk)
    assert [m.index for m in msgs] == list(range(len(msgs)))
    seen = [(m.layer, s, d) for m in msgs for s, d in zip(m.src_ids, m.dst_ids)]
    assert seen == [(la, s, s + 7) for la in range(layers) for s in src]
    assert all(1 <= len(m.src_ids) <= chunk for m in msgs)
    assert [m.layer for m in msgs] == sorted(m.layer for m in msgs)
    assert sum(m.last_of_layer for m in msgs) == (layers if src else 0)


@given(st.integers(0, 40), st.integers(1, 9), st.sampled_from(["none", "int8"]))
def test_wire_bytes_is_the_sum_of_message_bytes(n, chunk, compression) -> None:
    schema = KVCacheSchema(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4)
    msgs = messages(schema.num_layers, list(range(n)), list(range(n)), chunk)
    total = sum(message_bytes(schema, len(m.src_ids), compression) for m in msgs)
    assert wire_bytes(schema, n, chunk, compression) == total
    if compression == "none":
        assert total == n * schema.bytes_per_block


@given(st.integers(1, 12), st.integers(1, 8), st.data())
def test_matched_then_load_plan_takes_the_tail(num_blocks, bs, data) -> None:
    tokens = data.draw(st.integers((num_blocks - 1) * bs + 1, num_blocks * bs))
    offer = TransferPlan(
        "p", "", tuple(range(100, 100 + num_blocks)), 0, request_id="r", num_tokens=tokens
    )
    computed = data.draw(st.integers(0, tokens + bs))
    n = matched_tokens(offer, bs, computed)
    if computed % bs or computed >= tokens:
        assert n == 0
        return
    assert n == tokens - computed
    first = computed // bs
    dst = list(range(num_blocks - first))
    plan = load_plan(offer, bs, dst, n, "c", 10)
    assert plan.block_ids == offer.block_ids[first:]
    assert plan.dst_block_ids == tuple(dst) and plan.total_bytes == 10 * len(dst)
    assert (plan.request_id, plan.num_tokens, plan.source, plan.target) == ("r", n, "p", "c")


def test_load_plan_rejects_a_mismatch() -> None:
    offer = TransferPlan("p", "", (5, 6, 7), 0, request_id="r", num_tokens=10)
    with pytest.raises(ValueError, match=r"10 tokens fill 3 block\(s\) of 4, got 2"):
        load_plan(offer, 4, [1, 2], 10, "c", 1)
    with pytest.raises(ValueError, match="starts at token 1, inside a block of 4"):
        load_plan(offer, 4, [1, 2, 3], 9, "c", 1)
    with pytest.raises(ValueError, match="the producer holds 10 tokens"):
        load_plan(offer, 4, [1, 2, 3], 11, "c", 1)


def test_leases_expire_only_when_idle() -> None:
    t = LeaseTable(lease_s=2.0)
    t.offer("a", [1, 2], owned=True, now=0.0)
    t.offer("b", [3], owned=True, now=0.0)
    with pytest.raises(ValueError, match="'a' is already offered"):
        t.offer("a", [1], owned=True, now=0.0)
    assert t.begin("a", [2], now=1.0) is None  # renews a to 3.0 and marks it busy
    assert t.begin("a", [9], now=1.0) == "request 'a' does not hold block(s) [9]"
    assert [le.request_id for le in t.release_due(2.5)] == ["b"]  # a is busy
    t.end("a", now=2.6, ok=False)  # a failed send keeps the deadline (3.0)
    assert t.begin("b", [3], now=2.7) == "request 'b' is not offered (never, or already released)"
    assert t.release_due(2.9) == []
    assert [le.request_id for le in t.release_due(3.1)] == ["a"]


def test_acknowledged_leases_are_released_and_refused() -> None:
    t = LeaseTable(lease_s=5.0)
    t.offer("a", [1], owned=False, now=0.0)
    assert t.begin("a", [1], now=0.1) is None
    t.end("a", now=0.2, ok=True)
    assert t.served("a") == 1
    assert t.ack("a") and not t.ack("zz")
    assert t.begin("a", [1], now=0.3) == "request 'a' was already acknowledged"
    assert [le.request_id for le in t.release_due(0.4)] == ["a"]
    assert len(t) == 0
