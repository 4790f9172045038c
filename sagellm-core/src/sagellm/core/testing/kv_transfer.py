"""Conformance suite of :class:`sagellm.core.protocols.KVTransferChannel`.

A channel pairs two processes, so the suite does not build one: the subclass provides
:meth:`KVTransferChannelConformance.run_pair`, which runs a producer program and a
consumer program in two processes, each with its own channel (leases of ``lease_s``
seconds) over its own pool, plus a ``link`` for small objects (``link.put(obj)``,
``link.get(timeout_s)``), and returns both results. The suite runs one pair per class
(every check in one launch) and its tests assert on the results. Block contents are
seeded per request, layer, key/value and position, so the consumer recomputes exactly
what the producer wrote. torch is imported only inside functions.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from sagellm.core.types import KVCacheSchema, TransferPlan

__all__ = [
    "KVTransferChannelConformance",
    "block_values",
    "consumer_program",
    "producer_program",
]


def block_values(schema: KVCacheSchema, request: str, layer: int, kv: int, position: int) -> Any:
    """Contents of block ``position`` of ``request``'s KV, layer ``layer``, keys (0) or values (1)."""
    import torch

    seed = (sum(map(ord, request)) * 1_000_003 + layer * 1009 + kv * 101 + position) % 2**31
    gen = torch.Generator().manual_seed(seed)
    shape = (schema.block_size, schema.num_kv_heads, schema.head_size)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    return x.to(getattr(torch, schema.dtype))


def _fill(pool: Any, request: str, block_ids: Sequence[int]) -> None:
    for layer in range(pool.schema.num_layers):
        kv = pool.layer_cache(layer)
        for j in range(2):
            for pos, b in enumerate(block_ids):
                kv[j][b] = block_values(pool.schema, request, layer, j, pos)


def _equal(pool: Any, request: str, block_ids: Sequence[int], first_position: int) -> bool:
    import torch

    for layer in range(pool.schema.num_layers):
        kv = pool.layer_cache(layer)
        for j in range(2):
            for i, b in enumerate(block_ids):
                want = block_values(pool.schema, request, layer, j, first_position + i)
                if not torch.equal(kv[j][b], want):
                    return False
    return True


def _error_of(fn: Callable[[], Any]) -> str | None:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


def producer_program(channel: Any, pool: Any, link: Any, lease_s: float) -> dict[str, Any]:
    """The producer's half: offers three requests, waits for their release."""
    from sagellm.core.protocols import KVTransferChannel

    bs = pool.schema.block_size
    out: dict[str, Any] = {"is_channel": isinstance(channel, KVTransferChannel)}
    out["num_blocks"] = pool.num_blocks
    pool.allocate(1)  # so that producer and consumer ids differ
    ids_a = pool.allocate(3)
    ids_b = pool.allocate(2)
    ids_c = pool.allocate(2)
    for name, ids in (("req-a", ids_a), ("req-b", ids_b), ("push-c", ids_c)):
        _fill(pool, name, ids)
    keep, plan_a = channel.request_finished("req-a", ids_a, num_tokens=3 * bs - 1)
    out["keep_a"], out["plan_a"], out["ids_a"] = keep, plan_a, ids_a
    out["bad_tokens"] = _error_of(lambda: channel.request_finished("req-x", ids_b, 5 * bs))
    _, plan_b = channel.request_finished("req-b", ids_b)
    out["plan_b"] = plan_b
    plan_c = TransferPlan(
        source=plan_a.source,
        target="",
        block_ids=tuple(ids_c),
        total_bytes=2 * pool.schema.bytes_per_block,
        request_id="push-c",
    )
    channel.send(plan_c, pool)
    start = time.monotonic()
    link.put((plan_a, plan_b, plan_c))
    released: dict[str, float] = {}
    while time.monotonic() - start < 10 * lease_s + 30:
        sending, _ = channel.get_finished()
        for rid in sending:
            released.setdefault(rid, time.monotonic() - start)
        if {"req-a", "req-b"} <= set(released):
            break
        time.sleep(0.01)
    out["released"] = released
    out["wait_c"] = channel.wait(plan_c)
    out["c_refs"] = [pool.ref_count(b) for b in ids_c]
    pool.free(ids_c)
    out["consumer_done"] = link.get(60.0)  # keep serving until the consumer is done
    channel.get_finished()
    out["free_blocks"] = pool.num_free_blocks
    return out


def consumer_program(channel: Any, pool: Any, link: Any, lease_s: float) -> dict[str, Any]:
    """The consumer's half: scheduler-side answers, a partial load, a push, a refusal."""
    from sagellm.core.errors import SageLLMError
    from sagellm.core.protocols import KVTransferChannel

    bs = pool.schema.block_size
    out: dict[str, Any] = {"is_channel": isinstance(channel, KVTransferChannel)}
    plan_a, plan_b, plan_c = link.get(60.0)
    try:
        out["bad_plan"] = _error_of(
            lambda: channel.add_remote_request(dataclasses.replace(plan_a, request_id=""))
        )
        channel.add_remote_request(plan_a)
        out["matched"] = [
            channel.get_num_matched_tokens("req-a", n) for n in (0, bs, 1, 3 * bs)
        ] + [channel.get_num_matched_tokens("unknown", 0)]
        out["zero_plan"] = channel.update_state_after_alloc("req-a", [], 0)
        out["bad_count"] = _error_of(
            lambda: channel.update_state_after_alloc("req-a", [0], 3 * bs - 1)
        )
        out["bad_request"] = _error_of(lambda: channel.update_state_after_alloc("unknown", [0], bs))
        pool.allocate(2)
        dst = pool.allocate(2)
        load = channel.update_state_after_alloc("req-a", dst, 2 * bs - 1)
        out["load"] = load
        channel.start_load(load)
        channel.wait_for_layer(load, 0)
        out["seconds"] = channel.wait(load)
        out["equal_a"] = _equal(pool, "req-a", dst, 1)
        deadline = time.monotonic() + 30
        receiving: set[str] = set()
        while "req-a" not in receiving and time.monotonic() < deadline:
            receiving |= channel.get_finished()[1]
        out["receiving"] = sorted(receiving)
        dst_c = pool.allocate(2)
        push = dataclasses.replace(plan_c, dst_block_ids=tuple(dst_c))
        channel.receive(push, pool)
        channel.wait(push)
        out["equal_c"] = _equal(pool, "push-c", dst_c, 0)
        again = channel.update_state_after_alloc("req-a", pool.allocate(2), 2 * bs - 1)
        channel.start_load(again)
        try:
            channel.wait(again)
            out["refused"] = None
        except SageLLMError as exc:
            out["refused"] = (type(exc).__name__, str(exc))
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        link.put("done")
    return out


class KVTransferChannelConformance:
    """Behaviour every KV transfer channel shares. Implement :meth:`run_pair`.

    ``schema`` is the KV layout both pools use; ``lease_s`` the lease the channels must
    be built with (short: one test waits for an unacknowledged offer to expire).
    """

    schema: ClassVar[KVCacheSchema] = KVCacheSchema(
        num_layers=3, num_kv_heads=2, head_dim=8, block_size=4
    )
    num_blocks: ClassVar[int] = 16
    lease_s: ClassVar[float] = 1.0
    _results_cache: ClassVar[dict[type, tuple[dict[str, Any], dict[str, Any]]]] = {}

    def run_pair(
        self,
        producer: Callable[..., Any],
        consumer: Callable[..., Any],
        lease_s: float,
    ) -> tuple[Any, Any]:
        """Run ``producer(channel, pool, link, lease_s)`` and ``consumer(...)`` in two
        processes (pools of ``schema`` with ``num_blocks`` blocks, channels with leases
        of ``lease_s``); return both results (override this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement run_pair()")

    def _results(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if type(self) not in self._results_cache:
            p, c = self.run_pair(producer_program, consumer_program, self.lease_s)
            assert "error" not in c, c["error"]
            self._results_cache[type(self)] = (p, c)
        return self._results_cache[type(self)]

    def test_both_sides_are_channels(self) -> None:
        p, c = self._results()
        assert p["is_channel"] and c["is_channel"]

    def test_request_finished_keeps_and_offers(self) -> None:
        p, _ = self._results()
        bs = self.schema.block_size
        plan = p["plan_a"]
        assert p["keep_a"] is True
        assert plan.request_id == "req-a"
        assert plan.block_ids == tuple(p["ids_a"])
        assert plan.num_tokens == 3 * bs - 1
        assert plan.total_bytes == 3 * self.schema.bytes_per_block
        assert p["plan_b"].num_tokens == 2 * bs
        assert isinstance(p["bad_tokens"], str) and "req-x" in p["bad_tokens"]

    def test_matched_tokens(self) -> None:
        _, c = self._results()
        bs = self.schema.block_size
        # from 0, from one block, from inside a block (nothing), past the end, unknown
        assert c["matched"] == [3 * bs - 1, 2 * bs - 1, 0, 0, 0]
        assert c["zero_plan"] is None

    def test_bad_scheduler_input_raises_value_error(self) -> None:
        _, c = self._results()
        assert isinstance(c["bad_plan"], str) and "request_id" in c["bad_plan"]
        assert isinstance(c["bad_count"], str) and "req-a" in c["bad_count"]
        assert isinstance(c["bad_request"], str) and "unknown" in c["bad_request"]

    def test_partial_load_is_exact(self) -> None:
        p, c = self._results()
        load = c["load"]
        assert load.block_ids == tuple(p["ids_a"][1:])
        assert load.request_id == "req-a" and load.num_tokens == 2 * self.schema.block_size - 1
        assert len(load.dst_block_ids) == 2
        assert c["seconds"] >= 0.0
        assert c["equal_a"] is True
        assert c["receiving"] == ["req-a"]

    def test_send_receive_plan_is_exact(self) -> None:
        p, c = self._results()
        assert c["equal_c"] is True
        assert p["wait_c"] >= 0.0
        assert p["c_refs"] == [1, 1]  # send() leaves the caller's references alone

    def test_acknowledged_and_expired_offers_free_every_block(self) -> None:
        p, _ = self._results()
        # push-c (sent with send()) is released once acknowledged too, maybe later
        assert {"req-a", "req-b"} <= set(p["released"]) <= {"req-a", "req-b", "push-c"}
        # req-b was never loaded: released by its lease, not before
        assert p["released"]["req-b"] >= self.lease_s * 0.9
        assert p["free_blocks"] == p["num_blocks"] - 1  # only the producer's own block

    def test_a_released_offer_is_refused(self) -> None:
        _, c = self._results()
        assert c["refused"] is not None, "loading an acknowledged offer again must fail"
        name, message = c["refused"]
        assert "req-a" in message
