"""What every channel shares: the scheduler side, leases and the control plane.

Anchor: vLLM's ``KVConnectorBase_V1`` (scheduler-side ``get_num_new_matched_tokens`` /
``update_state_after_alloc`` / ``request_finished``, worker-side ``start_load_kv`` /
``wait_for_layer_load`` / ``get_finished``) and its NixlConnector's flow (the consumer
asks, the producer frees on the notification or when the lease runs out). Differences:
one object serves both sides; the control messages (load, done) go through the pair's
``torch.distributed.TCPStore`` (hosted by the producer) instead of a ZMQ side channel,
so a channel needs no transport of its own for them; the data goes through the
subclass's transport.

A load: the consumer posts ``load`` (request, source blocks, its schema and transport
details) under the next sequence number; the producer checks it (offered, blocks held,
lease alive, same schema), replies, and serves it (the torch channel sends, the Mooncake
channel writes, the NIXL channel lets the consumer read); the consumer posts ``done``
with an acknowledgement, and the producer frees the blocks at its next
:meth:`get_finished`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar

from pydantic import BaseModel

from sagellm.core.protocols import KVPool
from sagellm.core.types import TransferPlan
from sagellm.kv_transfer.config import ChannelConfig
from sagellm.kv_transfer.errors import KVTransferError
from sagellm.kv_transfer.leases import LeaseTable
from sagellm.kv_transfer.plan import load_plan, matched_tokens, offer_tokens

__all__ = ["BaseKVChannel", "KVTransferStats", "offer_key"]

# The control thread waits this long for the next message; close() wakes it earlier by
# posting a stop message itself (a store wait that times out logs a warning each time).
_IDLE = timedelta(days=1)
#: How often a producer waiting for its consumer looks at its stop flag.
_POLL = timedelta(seconds=0.5)
#: Store key a consumer posts before it joins the transport (see ``_await_consumer``).
_HELLO = "hello"


def offer_key(plan: TransferPlan) -> str:
    """The name both sides give a plan's offer: its request id, else its block ids."""
    return plan.request_id or "blocks/" + ",".join(str(b) for b in plan.block_ids)


@dataclass(slots=True)
class KVTransferStats:
    """Counters of one channel since the last :meth:`BaseKVChannel.make_stats`."""

    num_loads: int = 0  # counter: loads completed on this side (consumer)
    num_failed_loads: int = 0  # counter: loads that raised (consumer)
    num_served: int = 0  # counter: loads served (producer)
    num_refused: int = 0  # counter: loads refused (producer: unknown, expired, schema)
    bytes_received: int = 0  # counter: payload bytes written into the pool
    bytes_sent: int = 0  # counter: payload bytes read from the pool
    num_acked: int = 0  # counter: offers released after an acknowledgement
    num_expired: int = 0  # counter: offers released because the lease ran out
    num_blocks_freed: int = 0  # counter: block references the channel freed
    num_offered: int = 0  # gauge: offers held now


@dataclass
class _Load:
    """A consumer-side load and its progress."""

    plan: TransferPlan
    ack: bool  # acknowledge to the producer when done
    started: float = field(default_factory=time.monotonic)
    layers_done: int = 0
    seconds: float | None = None
    error: BaseException | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)

    def layer_done(self, layer: int) -> None:
        with self.cond:
            self.layers_done = max(self.layers_done, layer + 1)
            self.cond.notify_all()

    def finish(self, error: BaseException | None) -> None:
        with self.cond:
            self.error = error
            self.seconds = time.monotonic() - self.started
            self.cond.notify_all()


class BaseKVChannel:
    """KV transfer channel skeleton; subclasses move the bytes (see the module docstring).

    Subclass hooks: ``_connect_producer()`` (control thread, before the first message),
    ``_load_details()`` (extra fields of a ``load``), ``_check_load(msg)`` (producer:
    a refusal reason or None), ``_serve(seq, msg, src_ids)`` (producer: move or expose
    the blocks; returns bytes moved), ``_receive(seq, load, reply)`` (consumer: bring
    them in, calling ``load.layer_done``; returns bytes), ``_close_transport()``.
    ``_one_sided``: the consumer moves the data itself, so the producer's transfer ends
    with the consumer's ``done``.
    """

    config_class: ClassVar[type[BaseModel]] = ChannelConfig
    _one_sided: ClassVar[bool] = False

    def __init__(self, config: ChannelConfig, *, pool: KVPool | None = None) -> None:
        from torch.distributed import PrefixStore, TCPStore

        self.config = config
        self._pool: KVPool | None = pool
        self._timeout = timedelta(seconds=config.timeout_s)
        self._leases = LeaseTable(config.lease_s)
        self._lock = threading.Lock()
        self._offers: dict[str, TransferPlan] = {}  # consumer: what producers hold
        self._loads: dict[TransferPlan, _Load] = {}  # consumer: started loads
        self._served: dict[str, threading.Event] = {}  # producer: offer key -> served
        self._serve_errors: dict[str, str] = {}
        self._sending_done: set[str] = set()
        self._receiving_done: set[str] = set()
        self._stats = KVTransferStats()
        self._stop = threading.Event()
        self._closed = False
        self._fatal: str | None = None  # producer: why the transport is unusable
        self._seq = 0  # consumer: next control sequence number
        self._ctl_seq = 0  # producer: sequence number of the next message to read
        self._queue: deque[_Load] = deque()
        self._queue_cond = threading.Condition()
        try:
            if config.role == "producer":
                self._root = TCPStore(
                    config.host, config.port, None, True, self._timeout, wait_for_workers=False
                )
                self._port = int(self._root.port)
            else:
                self._root = TCPStore(config.host, config.port, None, False, self._timeout)
                self._port = config.port
        except Exception as exc:
            where = "listen on" if config.role == "producer" else "reach the producer at"
            raise KVTransferError(
                f"{type(self).__name__} ({config.role}) could not {where} {config.address}: "
                f"{exc}; check the address and that the producer runs"
            ) from exc
        self._store = PrefixStore("sagellm-kv/", self._root)
        # the background thread's store connection: a store client serves one call at a
        # time, so a thread blocked in wait() would hold up every other caller of it
        self._ctl: Any = self._store
        self.instance_id = config.instance_id or f"{config.role}@{self.address}"
        if config.role == "consumer":
            self._store.set(_HELLO, self.instance_id)  # the producer joins the transport now
        target = self._producer_loop if config.role == "producer" else self._consumer_loop
        self._thread = threading.Thread(target=target, name=f"kv-{config.role}", daemon=True)

    def _start(self) -> None:
        """Start the background thread (subclasses call it at the end of __init__)."""
        self._thread.start()

    # ---------------------------------------------------------------- properties

    @property
    def address(self) -> str:
        """``host:port`` of the pair's store (the port the producer got for port 0)."""
        return f"{self.config.host}:{self._port}"

    @property
    def role(self) -> str:
        """``producer`` or ``consumer``."""
        return self.config.role

    def _need_pool(self) -> KVPool:
        if self._pool is None:
            raise RuntimeError(
                f"{type(self).__name__} has no KV pool: pass pool= or call register_pool first"
            )
        return self._pool

    def _need_role(self, role: str, what: str) -> None:
        if self.config.role != role:
            raise RuntimeError(
                f"{what} is a {role}-side call; this channel is a {self.config.role} "
                f"(TorchChannelConfig(role={role!r}) builds one)"
            )
        if self._closed:
            raise RuntimeError(f"{what}: the channel is closed")

    # ---------------------------------------------------------------- scheduler side

    def add_remote_request(self, plan: TransferPlan) -> None:
        """Consumer: remember what a producer holds of ``plan.request_id``."""
        self._need_role("consumer", "add_remote_request")
        bs = self._need_pool().schema.block_size
        if not plan.request_id:
            raise ValueError("add_remote_request: the plan has no request_id")
        if not plan.block_ids:
            raise ValueError(f"add_remote_request: plan of {plan.request_id!r} has no blocks")
        tokens = offer_tokens(plan, bs)
        if not (len(plan.block_ids) - 1) * bs < tokens <= len(plan.block_ids) * bs:
            raise ValueError(
                f"add_remote_request: {tokens} tokens of {plan.request_id!r} do not fill "
                f"{len(plan.block_ids)} block(s) of {bs} (the last block holds 1..{bs})"
            )
        with self._lock:
            self._offers[plan.request_id] = plan

    def get_num_matched_tokens(self, request_id: str, num_computed_tokens: int) -> int | None:
        """Consumer: tokens past ``num_computed_tokens`` the producer holds (0 if none)."""
        with self._lock:
            plan = self._offers.get(request_id)
        if plan is None:
            return 0
        return matched_tokens(plan, self._need_pool().schema.block_size, num_computed_tokens)

    def update_state_after_alloc(
        self, request_id: str, block_ids: Sequence[int], num_external_tokens: int
    ) -> TransferPlan | None:
        """Consumer: the load plan filling local ``block_ids`` with the remote tokens."""
        if num_external_tokens == 0:
            return None
        with self._lock:
            offer = self._offers.get(request_id)
        if offer is None:
            raise ValueError(
                f"update_state_after_alloc: request {request_id!r} is unknown; "
                "call add_remote_request with the producer's plan first"
            )
        schema = self._need_pool().schema
        return load_plan(
            offer,
            schema.block_size,
            block_ids,
            num_external_tokens,
            self.instance_id,
            schema.bytes_per_block,
        )

    def request_finished(
        self, request_id: str, block_ids: Sequence[int], num_tokens: int | None = None
    ) -> tuple[bool, TransferPlan | None]:
        """Producer: keep ``block_ids`` (taking the caller's references) and offer them."""
        if self.config.role != "producer" or not block_ids:
            return False, None
        self._need_role("producer", "request_finished")
        schema = self._need_pool().schema
        bs = schema.block_size
        n = len(block_ids)
        tokens = n * bs if num_tokens is None else num_tokens
        if not (n - 1) * bs < tokens <= n * bs:
            raise ValueError(
                f"request_finished: {tokens} tokens of {request_id!r} do not fill {n} "
                f"block(s) of {bs}"
            )
        ids = tuple(int(b) for b in block_ids)
        self._leases.offer(request_id, ids, owned=True, now=time.monotonic())
        plan = TransferPlan(
            source=self.address,
            target="",
            block_ids=ids,
            total_bytes=n * schema.bytes_per_block,
            request_id=request_id,
            num_tokens=tokens,
        )
        return True, plan

    def get_finished(self) -> tuple[frozenset[str], frozenset[str]]:
        """Release acknowledged and expired offers (freeing owned blocks); report ids."""
        now = time.monotonic()
        for lease in self._leases.release_due(now):
            self._release(lease, expired=not lease.acked)
        with self._lock:
            sending, receiving = frozenset(self._sending_done), frozenset(self._receiving_done)
            self._sending_done.clear()
            self._receiving_done.clear()
        return sending, receiving

    def _release(self, lease: Any, expired: bool) -> None:
        if lease.owned and self._pool is not None:
            self._pool.free(list(lease.block_ids))
            self._stats.num_blocks_freed += len(lease.block_ids)
        if expired:
            self._stats.num_expired += 1
        else:
            self._stats.num_acked += 1
        with self._lock:
            self._sending_done.add(lease.request_id)

    # ---------------------------------------------------------------- worker side

    def register_pool(self, pool: KVPool) -> None:
        """Use ``pool`` as the local block storage."""
        if self._pool is not None and self._pool is not pool:
            raise RuntimeError("register_pool: a different pool is already registered")
        self._pool = pool

    def send(self, plan: TransferPlan, pool: KVPool) -> None:
        """Producer: offer the plan's blocks (the caller keeps its references)."""
        self._need_role("producer", "send")
        self.register_pool(pool)
        key = offer_key(plan)
        with self._lock:
            self._served[key] = threading.Event()
        self._leases.offer(key, plan.block_ids, owned=False, now=time.monotonic())

    def receive(self, plan: TransferPlan, pool: KVPool) -> None:
        """Consumer: load the plan's blocks into ``pool`` at ``plan.dst_block_ids``."""
        self._need_role("consumer", "receive")
        self.register_pool(pool)
        self._enqueue(plan)

    def start_load(self, plan: TransferPlan) -> None:
        """Consumer: begin loading ``plan``; returns at once."""
        self._need_role("consumer", "start_load")
        self._need_pool()
        self._enqueue(plan)

    def _enqueue(self, plan: TransferPlan) -> None:
        if len(plan.dst_block_ids) != len(plan.block_ids):
            raise ValueError(
                f"plan of {offer_key(plan)!r} has {len(plan.block_ids)} source block(s) but "
                f"{len(plan.dst_block_ids)} dst_block_ids; update_state_after_alloc builds one"
            )
        if not plan.block_ids:
            raise ValueError("the plan has no blocks")
        load = _Load(plan, ack=True)
        with self._lock:
            if plan in self._loads:
                raise ValueError(f"the plan of {offer_key(plan)!r} was already started")
            self._loads[plan] = load
        with self._queue_cond:
            self._queue.append(load)
            self._queue_cond.notify()

    def _load_of(self, plan: TransferPlan) -> _Load:
        with self._lock:
            load = self._loads.get(plan)
        if load is None:
            raise ValueError(f"the plan of {offer_key(plan)!r} was not started on this channel")
        return load

    def wait_for_layer(self, plan: TransferPlan, layer: int) -> None:
        """Consumer: block until ``layer`` of a started plan is in the pool."""
        load = self._load_of(plan)
        num_layers = self._need_pool().schema.num_layers
        if not 0 <= layer < num_layers:
            raise ValueError(f"wait_for_layer: layer must be in 0..{num_layers - 1}, got {layer}")
        with load.cond:
            ok = load.cond.wait_for(
                lambda: load.layers_done > layer or load.seconds is not None,
                self.config.timeout_s,
            )
            if load.error is not None:
                raise load.error
            if not ok:
                raise TimeoutError(
                    f"layer {layer} of {offer_key(plan)!r} did not arrive within "
                    f"{self.config.timeout_s:g} s"
                )

    def wait(self, plan: TransferPlan) -> float:
        """Block until the plan is done on this side; seconds it took."""
        if self.config.role == "producer":
            key = offer_key(plan)
            with self._lock:
                event = self._served.get(key)
            if event is None:
                raise ValueError(f"wait: plan {key!r} was not sent on this channel")
            start = time.monotonic()
            if not event.wait(self.config.timeout_s):
                raise TimeoutError(
                    f"plan {key!r} was not received within {self.config.timeout_s:g} s"
                )
            with self._lock:
                error = self._serve_errors.get(key)
            if error is not None:
                raise KVTransferError(error)
            return time.monotonic() - start
        load = self._load_of(plan)
        with load.cond:
            done = load.cond.wait_for(lambda: load.seconds is not None, self.config.timeout_s)
        if not done:
            raise TimeoutError(
                f"the load of {offer_key(plan)!r} from {plan.source} did not finish within "
                f"{self.config.timeout_s:g} s"
            )
        if load.error is not None:
            raise load.error
        assert load.seconds is not None
        return load.seconds

    def make_stats(self) -> KVTransferStats:
        """Counters since the last call, and the offers held now."""
        stats, self._stats = self._stats, KVTransferStats()
        stats.num_offered = len(self._leases)
        return stats

    def close(self) -> None:
        """Stop the thread, free what the channel owns, release the transport."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._queue_cond:
            self._queue_cond.notify_all()
        if self.config.role == "producer" and self._thread.is_alive():
            seq = self._ctl_seq
            for k in (seq, seq + 1):  # the thread may be about to wait for the next one
                self._store.set(f"c2p/{k}", json.dumps({"op": "stop"}))
        if self._thread.is_alive():
            self._thread.join(timeout=self.config.timeout_s)
        for lease in self._leases.release_all():
            self._release(lease, expired=False)
        self._close_transport()
        with self._lock:
            pending = [ld for ld in self._loads.values() if ld.seconds is None]
        for load in pending:
            load.finish(KVTransferError("the channel was closed before the load finished"))

    def __enter__(self) -> BaseKVChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- control plane

    def _post(self, key: str, msg: dict[str, Any]) -> None:
        self._ctl.set(key, json.dumps(msg))

    def _take(self, key: str, timeout: timedelta) -> dict[str, Any]:
        self._ctl.wait([key], timeout)
        raw = self._ctl.get(key)
        self._ctl.delete_key(key)
        out: dict[str, Any] = json.loads(raw)
        return out

    def _await_consumer(self) -> bool:
        """Producer: wait, for as long as the channel is open, until a consumer announces
        itself (it posts ``hello`` before joining the transport); True once one has.

        A prefill instance usually starts before its decode instance, by any delay: the
        transport (a gloo pair, a Mooncake or NIXL handshake) is formed only once the
        consumer is there, each side then waiting at most ``timeout_s``.
        """
        while not self._stop.is_set():
            try:
                self._ctl.wait([_HELLO], _POLL)
                return True
            except Exception:  # timed out: look at the stop flag, then wait again
                continue
        return False

    def _producer_loop(self) -> None:
        from torch.distributed import PrefixStore, TCPStore

        try:
            client = TCPStore(self.config.host, self._port, None, False, self._timeout)
            self._ctl = PrefixStore("sagellm-kv/", client)
            if not self._await_consumer():
                return  # closed before any consumer came
            self._connect_producer()
        except Exception as exc:
            self._fatal = f"the consumer did not connect to {self.address}: {exc}"
            return
        while not self._stop.is_set():
            try:
                msg = self._take(f"c2p/{self._ctl_seq}", _IDLE)
            except Exception as exc:
                self._fatal = f"the control store failed: {exc}"
                return
            self._ctl_seq += 1
            try:
                if msg["op"] == "stop":
                    return
                if msg["op"] == "load":
                    self._handle_load(msg)
                elif msg["op"] == "done":
                    self._handle_done(msg)
            except Exception as exc:  # the transport broke: no further load can work
                self._fatal = f"{type(exc).__name__}: {exc}"
                return

    def _handle_load(self, msg: dict[str, Any]) -> None:
        key, seq, src_ids = msg["request_id"], msg["seq"], [int(b) for b in msg["block_ids"]]
        reason = self._check_schema(msg) or self._check_load(msg)
        if reason is None:
            reason = self._leases.begin(key, src_ids, time.monotonic())
        if reason is not None:
            self._stats.num_refused += 1
            self._post(f"p2c/{seq}", {"ok": False, "error": reason})
            return
        self._post(f"p2c/{seq}", {"ok": True, **self._reply_details(msg)})
        if self._one_sided:
            return  # the consumer reads; its "done" ends the transfer
        try:
            moved = self._serve(seq, msg, src_ids)
        except Exception as exc:
            self._leases.end(key, time.monotonic(), ok=False)
            self._mark_served(key, f"serving {key!r} to the consumer failed: {exc}")
            raise
        self._stats.bytes_sent += moved
        self._stats.num_served += 1
        self._leases.end(key, time.monotonic(), ok=True)
        self._mark_served(key, None)

    def _handle_done(self, msg: dict[str, Any]) -> None:
        key = msg["request_id"]
        if self._one_sided:
            self._leases.end(key, time.monotonic(), ok=bool(msg["ok"]))
            if msg["ok"]:
                self._stats.num_served += 1
                self._stats.bytes_sent += int(msg.get("bytes", 0))
            self._mark_served(key, None if msg["ok"] else f"the consumer failed: {msg['error']}")
        if msg["ok"] and msg.get("ack"):
            self._leases.ack(key)

    def _mark_served(self, key: str, error: str | None) -> None:
        with self._lock:
            event = self._served.get(key)
            if error is not None:
                self._serve_errors[key] = error
        if event is not None:
            event.set()

    def _check_schema(self, msg: dict[str, Any]) -> str | None:
        mine = self._need_pool().schema.model_dump()
        if msg["schema"] != mine:
            return f"KV schemas differ: producer {mine}, consumer {msg['schema']}"
        return None

    def _consumer_loop(self) -> None:
        while True:
            with self._queue_cond:
                while not self._queue and not self._stop.is_set():
                    self._queue_cond.wait()
                if self._stop.is_set():
                    return
                load = self._queue.popleft()
            self._run(load)

    def _run(self, load: _Load) -> None:
        plan, key = load.plan, offer_key(load.plan)
        seq, self._seq = self._seq, self._seq + 1
        peer = plan.source or self.config.address
        try:
            self._post(
                f"c2p/{seq}",
                {
                    "op": "load",
                    "seq": seq,
                    "request_id": key,
                    "block_ids": list(plan.block_ids),
                    "dst_block_ids": list(plan.dst_block_ids),
                    "schema": self._need_pool().schema.model_dump(),
                    **self._load_details(load),
                },
            )
            reply = self._take(f"p2c/{seq}", self._timeout)
            if not reply["ok"]:
                raise KVTransferError(f"the producer at {peer} refused {key!r}: {reply['error']}")
            moved = self._receive(seq, load, reply)
            self._post(
                f"c2p/{seq + 1}",
                {
                    "op": "done",
                    "seq": seq,
                    "request_id": key,
                    "ok": True,
                    "ack": load.ack,
                    "bytes": moved,
                },
            )
            self._seq += 1
        except Exception as exc:
            self._stats.num_failed_loads += 1
            error = (
                exc
                if isinstance(exc, KVTransferError)
                else KVTransferError(
                    f"loading {key!r} from the producer at {peer} failed "
                    f"({type(exc).__name__}: {exc}); the producer may have exited"
                )
            )
            if error is not exc:
                error.__cause__ = exc
            self._finish(load, error)
            return
        self._stats.num_loads += 1
        self._stats.bytes_received += moved
        self._finish(load, None)

    def _finish(self, load: _Load, error: BaseException | None) -> None:
        load.finish(error)
        with self._lock:
            self._receiving_done.add(load.plan.request_id or offer_key(load.plan))

    # ---------------------------------------------------------------- subclass hooks

    def _connect_producer(self) -> None:
        """Producer, control thread: finish connecting before the first message."""

    def _load_details(self, load: _Load) -> dict[str, Any]:
        """Consumer: extra fields of a ``load`` message."""
        return {}

    def _check_load(self, msg: dict[str, Any]) -> str | None:
        """Producer: why a ``load`` cannot be served (None: it can)."""
        return None

    def _reply_details(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Producer: extra fields of the reply to an accepted ``load``."""
        return {}

    def _serve(self, seq: int, msg: dict[str, Any], src_ids: list[int]) -> int:
        """Producer: move the blocks of an accepted load; payload bytes moved."""
        raise NotImplementedError

    def _receive(self, seq: int, load: _Load, reply: dict[str, Any]) -> int:
        """Consumer: bring the blocks in (``load.layer_done`` per layer); bytes moved."""
        raise NotImplementedError

    def _close_transport(self) -> None:
        """Release the transport."""
