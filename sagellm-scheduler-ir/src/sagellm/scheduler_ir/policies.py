"""Scheduling policies built on the FCFS step rule through its hooks.

Each policy only changes the order of service (which waiting request next, where an
admitted request sits among the running ones, which one is preempted) or how the step's
token budget is shared; budgets, allocation, chunking and preemption stay in
:class:`FCFSScheduler`. Every policy inherits admission control (``max_waiting``,
``max_queue_tokens``, ``admission``).

Policies that learn from the engine's timings have an optional method
``observe_step(num_tokens, seconds)``: an engine that finds it calls it after each step
with the tokens the step computed and its wall time.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from sagellm.core.types import ExecutionPlan, IRGraph, IRNode, IRNodeKind, SchedulerOutput
from sagellm.scheduler_ir.config import (
    AdaptiveSchedulerConfig,
    FairSchedulerConfig,
    PDSchedulerConfig,
    PrioritySchedulerConfig,
    SLOSchedulerConfig,
)
from sagellm.scheduler_ir.fcfs import FCFSScheduler, RequestState

__all__ = [
    "AdaptiveScheduler",
    "FairScheduler",
    "PDScheduler",
    "PriorityScheduler",
    "SLOScheduler",
    "split_plan",
]


def _is_decoding(state: RequestState) -> bool:
    return state.num_computed_tokens >= len(state.token_ids) - 1


class PriorityScheduler(FCFSScheduler):
    """Lower ``GenerationRequest.priority`` first, ties by arrival (then by add order).

    The running list is kept sorted by the same key, so the request preempted when the
    pool is full is the lowest-priority one. When the sequence cap is hit or the pool is
    full, a waiting request preempts the lowest-priority running request by recompute if
    that one has a strictly larger priority value (and, with
    ``max_victim_computed_tokens``, has not computed more tokens than that).
    """

    config_class: ClassVar[type[PrioritySchedulerConfig]] = PrioritySchedulerConfig
    config: PrioritySchedulerConfig

    def __init__(self, config: PrioritySchedulerConfig | None = None, **context: Any) -> None:
        super().__init__(config or PrioritySchedulerConfig(), **context)
        self._order = itertools.count()
        self._keys: dict[str, tuple[int, float, int]] = {}
        self._wkeys: list[tuple[int, float, int]] = []

    def _key(self, state: RequestState) -> tuple[int, float, int]:
        k = self._keys.get(state.request_id)
        if k is None:
            r = state.request
            k = self._keys[state.request_id] = (r.priority, r.arrival_time, next(self._order))
        return k

    # The waiting deque is kept sorted by key (``_wkeys`` in parallel), so the head is next.
    def _enqueue(self, state: RequestState) -> None:
        k = self._key(state)
        i = bisect.bisect_right(self._wkeys, k)
        self._wkeys.insert(i, k)
        self._waiting.insert(i, state)
        self._queue_tokens += len(state.token_ids)

    _requeue = _enqueue  # a preempted request keeps its rank

    def _remove_waiting(self, state: RequestState) -> None:
        if self._waiting and self._waiting[0] is state:
            i = 0
        else:
            i = self._waiting.index(state)
        del self._waiting[i]
        del self._wkeys[i]
        self._queue_tokens -= len(state.token_ids)

    def _insert_running(self, state: RequestState) -> None:
        i = bisect.bisect_right(self._running, self._key(state), key=self._key)
        self._running.insert(i, state)

    def _admission_victim(self, state: RequestState) -> RequestState | None:
        if not self.config.preempt_for_priority or not self._running:
            return None
        worst = self._running[-1]
        if worst.request.priority <= state.request.priority:
            return None
        cap = self.config.max_victim_computed_tokens
        if cap and worst.num_computed_tokens > cap:
            return None  # recomputing it would cost more than the wait saves
        return worst

    def finish_requests(self, request_ids: Any, reason: Any) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        super().finish_requests(ids, reason)
        for rid in ids:
            self._keys.pop(rid, None)


class FairScheduler(FCFSScheduler):
    """Deficit round-robin over tenants' waiting queues, weighted by ``weights``.

    Each visit of a tenant with waiting requests adds ``quantum * weight`` to its deficit;
    it admits its oldest waiting request while the deficit covers that request's prompt
    tokens, then the turn passes to the next tenant. A tenant whose queue empties loses
    its deficit. Within a tenant, order is FCFS (preempted requests first).
    """

    config_class: ClassVar[type[FairSchedulerConfig]] = FairSchedulerConfig
    config: FairSchedulerConfig

    def __init__(self, config: FairSchedulerConfig | None = None, **context: Any) -> None:
        super().__init__(config or FairSchedulerConfig(), **context)
        self._tenants: list[str] = []  # round-robin order: first seen first
        self._deficit: dict[str, float] = {}
        self._pos = 0
        self._fresh = True  # the current tenant has not received its quantum this visit
        self._peeked: RequestState | None = None  # the head the last peek chose

    def _enqueue(self, state: RequestState) -> None:
        t = state.request.tenant
        if t not in self._deficit:
            self._tenants.append(t)
            self._deficit[t] = 0.0
        super()._enqueue(state)

    def _peek_waiting(self) -> RequestState:
        heads: dict[str, RequestState] = {}
        for s in self._waiting:
            heads.setdefault(s.request.tenant, s)
        cfg = self.config
        while True:
            t = self._tenants[self._pos]
            head = heads.get(t)
            if head is not None:
                if self._fresh:
                    self._deficit[t] += cfg.quantum * cfg.weights.get(t, 1.0)
                    self._fresh = False
                if self._deficit[t] >= len(head.token_ids):
                    self._peeked = head
                    return head
            else:
                self._deficit[t] = 0.0
            self._pos = (self._pos + 1) % len(self._tenants)
            self._fresh = True

    def _remove_waiting(self, state: RequestState) -> None:
        super()._remove_waiting(state)
        if state is not self._peeked:  # removed outside admission (abort): nothing charged
            return
        self._peeked = None
        t = state.request.tenant
        self._deficit[t] -= len(state.token_ids)
        if not any(s.request.tenant == t for s in self._waiting):
            self._deficit[t] = 0.0


class _PrefillCapped(FCFSScheduler):
    """Shared machinery: decodes run before prefill chunks, and prefill tokens per step are
    capped by ``_prefill_left`` (set by the subclass in ``_begin_step``)."""

    def __init__(self, config: Any, **context: Any) -> None:
        super().__init__(config, **context)
        self._prefill_left: int | None = None  # None: no cap beyond the step budget

    def _begin_step(self) -> None:
        # Decoding requests first (stable), so their tokens always fit before prefill
        # chunks take the budget; the tail (victim of preemption) is then a prefill.
        self._running.sort(key=lambda s: not _is_decoding(s))

    def _prefill_cap(self) -> int | None:
        return self._prefill_left

    def _chunk_len(self, state: RequestState, budget: int) -> int:
        n = super()._chunk_len(state, budget)
        cap = self._prefill_cap()
        if cap is not None and not _is_decoding(state):
            n = min(n, cap)
        return n

    def _chunk(self, state: RequestState, num_new: int) -> Any:
        chunk = super()._chunk(state, num_new)
        if self._prefill_left is not None and chunk.is_prefill:
            self._prefill_left -= num_new
        return chunk


class SLOScheduler(_PrefillCapped):
    """Least-slack-first admission under TTFT deadlines; decodes protected for TPOT.

    Slack of a waiting request = arrival + TTFT objective - now - estimated prefill time,
    where the estimate is ``steps * a + b * tokens`` (``a = step_overhead_ms``, ``b`` the
    per-token cost, refined by :meth:`observe_step`). Preempted requests, which already
    have their first token, go first; requests without a TTFT objective go after those
    with one (by arrival); with ``demote_missed`` a request that can no longer meet its
    TTFT goes last. Each step, decodes are scheduled first and prefill tokens are capped
    so the estimated step time stays within the tightest TPOT objective among running
    decodes (at least one block of prefill per step, so prefill always progresses).

    ``clock`` (context) returns seconds; it defaults to ``time.monotonic``, which is the
    clock of ``GenerationRequest.arrival_time``.
    """

    config_class: ClassVar[type[SLOSchedulerConfig]] = SLOSchedulerConfig
    config: SLOSchedulerConfig

    def __init__(
        self,
        config: SLOSchedulerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        **context: Any,
    ) -> None:
        cfg = config or SLOSchedulerConfig()
        super().__init__(cfg, **context)
        self.clock = clock
        self.per_token_ms = cfg.per_token_ms
        self._now = 0.0

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """Refine the per-token cost from one step's wall time (optional engine hook)."""
        if num_tokens <= 0 or seconds < 0:
            return
        sample = max(0.0, seconds * 1000.0 - self.config.step_overhead_ms) / num_tokens
        w = self.config.ewma
        self.per_token_ms = (1 - w) * self.per_token_ms + w * sample

    def estimate_ms(self, num_tokens: int) -> float:
        """Estimated time to compute ``num_tokens`` of one request's prefill."""
        steps = math.ceil(num_tokens / self.config.max_num_batched_tokens)
        return steps * self.config.step_overhead_ms + self.per_token_ms * num_tokens

    def _ttft_ms(self, state: RequestState) -> float | None:
        v = state.request.slo.ttft_ms
        return v if v is not None else self.config.default_ttft_ms

    def _tpot_ms(self, state: RequestState) -> float | None:
        v = state.request.slo.tpot_ms
        return v if v is not None else self.config.default_tpot_ms

    def slack_ms(self, state: RequestState, now: float | None = None) -> float:
        """TTFT slack of a waiting request (inf without an objective)."""
        ttft = self._ttft_ms(state)
        if ttft is None:
            return math.inf
        now = self.clock() if now is None else now
        remaining = len(state.token_ids) - state.num_computed_tokens
        deadline_ms = (state.request.arrival_time - now) * 1000.0 + ttft
        return deadline_ms - self.estimate_ms(remaining)

    def _key(self, state: RequestState) -> tuple[int, float, float]:
        arrival = state.request.arrival_time
        if len(state.token_ids) > len(state.request.prompt_token_ids):
            return (0, 0.0, arrival)  # preempted after its first token
        slack = self.slack_ms(state, self._now)
        if slack == math.inf:
            return (2, 0.0, arrival)
        if slack < 0 and self.config.demote_missed:
            return (3, 0.0, arrival)
        return (1, slack, arrival)

    def _begin_step(self) -> None:
        super()._begin_step()
        self._now = self.clock()
        # Slack changes with time only, so one sort per step orders the queue; requests
        # preempted during the step go to the front (they rank first anyway).
        if len(self._waiting) > 1:
            self._waiting = deque(sorted(self._waiting, key=self._key))
        cfg = self.config
        tpots = [t for s in self._running if _is_decoding(s) and (t := self._tpot_ms(s))]
        if not tpots:
            self._prefill_left = None
            return
        n_decode = sum(1 for s in self._running if _is_decoding(s))
        room = (min(tpots) - cfg.step_overhead_ms) / max(self.per_token_ms, 1e-9) - n_decode
        self._prefill_left = max(self.block_size, int(room))


class AdaptiveScheduler(_PrefillCapped):
    """FCFS whose prefill share of the token budget follows what :meth:`observe_step` sees.

    After each observed step: when the step took longer than ``target_tpot_ms`` while
    requests were decoding (their TPOT is the step time), the share shrinks by ``step``
    (down to ``min_prefill_share``); otherwise, when more than ``queue_high`` requests
    wait, it grows by ``step`` (up to 1). Decodes are always scheduled first. Without
    observations the share stays at ``initial_prefill_share``.
    """

    config_class: ClassVar[type[AdaptiveSchedulerConfig]] = AdaptiveSchedulerConfig
    config: AdaptiveSchedulerConfig

    def __init__(self, config: AdaptiveSchedulerConfig | None = None, **context: Any) -> None:
        cfg = config or AdaptiveSchedulerConfig()
        super().__init__(cfg, **context)
        self.prefill_share = cfg.initial_prefill_share

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """Adjust the prefill share from one step's wall time (optional engine hook)."""
        cfg = self.config
        decoding = any(_is_decoding(s) for s in self._running)
        if decoding and seconds * 1000.0 > cfg.target_tpot_ms:
            self.prefill_share = max(cfg.min_prefill_share, self.prefill_share - cfg.step)
        elif self.num_waiting > cfg.queue_high:
            self.prefill_share = min(1.0, self.prefill_share + cfg.step)

    def _begin_step(self) -> None:
        super()._begin_step()
        cap = int(self.prefill_share * self.config.max_num_batched_tokens)
        self._prefill_left = max(1, cap)


class PDScheduler(_PrefillCapped):
    """Prefill/decode separation inside one engine.

    The step has a prefill budget and a decode budget (their sum, at most
    ``max_num_batched_tokens``, is the step budget) and a sequence cap per side. Decodes
    come first and never take prefill tokens; prefill chunks never take decode tokens.
    The plan marks prefill nodes and decode nodes with distinct ``device`` hints and
    ``config["phase"]``, so :func:`split_plan` can cut it for two instances.
    """

    config_class: ClassVar[type[PDSchedulerConfig]] = PDSchedulerConfig
    config: PDSchedulerConfig

    def __init__(self, config: PDSchedulerConfig | None = None, **context: Any) -> None:
        super().__init__(config or PDSchedulerConfig(), **context)
        self._decode_left = 0
        self._decode_seqs_left = 0
        self._num_prefilling = 0

    def _token_budget(self) -> int:
        cfg = self.config
        return min(cfg.max_num_batched_tokens, cfg.prefill_token_budget + cfg.decode_token_budget)

    def _begin_step(self) -> None:
        super()._begin_step()
        cfg = self.config
        self._prefill_left = cfg.prefill_token_budget
        self._decode_left = cfg.decode_token_budget
        self._decode_seqs_left = cfg.max_num_decode_seqs
        self._num_prefilling = sum(1 for s in self._running if not _is_decoding(s))

    def _can_admit(self, state: RequestState) -> bool:
        return self._num_prefilling < self.config.max_num_prefill_seqs

    def _insert_running(self, state: RequestState) -> None:
        super()._insert_running(state)
        self._num_prefilling += 1  # an admitted request prefills (preemptions only lower it)

    def _chunk_len(self, state: RequestState, budget: int) -> int:
        n = super()._chunk_len(state, budget)
        if _is_decoding(state):
            if self._decode_seqs_left <= 0:
                return 0
            n = min(n, self._decode_left)
        return n

    def _chunk(self, state: RequestState, num_new: int) -> Any:
        chunk = super()._chunk(state, num_new)
        if not chunk.is_prefill:
            self._decode_left -= num_new
            self._decode_seqs_left -= 1
        return chunk

    def build_plan(self, output: SchedulerOutput) -> ExecutionPlan:
        plan = super().build_plan(output)
        cfg = self.config
        nodes = []
        for n in plan.graph.nodes:
            if n.kind is IRNodeKind.PREFILL_CHUNK:
                n = _with(n, cfg.prefill_device, "prefill")
            elif n.kind is IRNodeKind.DECODE_BATCH:
                n = _with(n, cfg.decode_device, "decode")
            nodes.append(n)
        return ExecutionPlan(
            plan_id=plan.plan_id,
            graph=IRGraph(nodes=tuple(nodes)),
            request_ids=plan.request_ids,
            target_instance_id=plan.target_instance_id,
        )


def _with(node: IRNode, device: str, phase: str, **extra: Any) -> IRNode:
    return IRNode(
        node_id=node.node_id,
        kind=node.kind,
        inputs=node.inputs,
        chunks=node.chunks,
        migrations=node.migrations,
        transfers=node.transfers,
        device=device,
        config={**node.config, "phase": phase, **extra},
    )


def split_plan(
    plan: ExecutionPlan,
    *,
    prefill_instance_id: str = "prefill",
    decode_instance_id: str = "decode",
) -> tuple[ExecutionPlan, ExecutionPlan]:
    """Cut a plan into a prefill plan and a decode plan (the seeds' ``PDSeparator.split``).

    Compute nodes go to the half named by ``config["phase"]`` (unmarked nodes by kind);
    KV migrations are copied into each half that has compute; the sample node is split so
    each half samples its own requests. Node ids are kept; inputs that point into the
    other half are dropped. Either half may have no nodes.
    """
    phase_of: dict[int, str] = {}
    for n in plan.graph.nodes:
        if n.kind is IRNodeKind.PREFILL_CHUNK or n.kind is IRNodeKind.DECODE_BATCH:
            default = "prefill" if n.kind is IRNodeKind.PREFILL_CHUNK else "decode"
            phase_of[n.node_id] = str(n.config.get("phase", default))
    halves: dict[str, list[IRNode]] = {"prefill": [], "decode": []}
    for phase, out in halves.items():
        mine = {i for i, p in phase_of.items() if p == phase}
        if not mine:
            continue
        kept: set[int] = set()
        for n in plan.graph.nodes:
            if n.node_id in phase_of and n.node_id not in mine:
                continue
            if n.kind is IRNodeKind.SAMPLE:
                rids = tuple(
                    c.request_id
                    for m in plan.graph.nodes
                    if m.node_id in mine
                    for c in m.chunks
                    if c.sample
                )
                if not rids:
                    continue
                n = IRNode(
                    node_id=n.node_id,
                    kind=n.kind,
                    inputs=tuple(i for i in n.inputs if i in kept),
                    device=n.device,
                    config={**n.config, "request_ids": rids},
                )
            elif any(i not in kept for i in n.inputs):
                n = IRNode(
                    node_id=n.node_id,
                    kind=n.kind,
                    inputs=tuple(i for i in n.inputs if i in kept),
                    chunks=n.chunks,
                    migrations=n.migrations,
                    transfers=n.transfers,
                    device=n.device,
                    config=n.config,
                )
            out.append(n)
            kept.add(n.node_id)

    def plan_of(nodes: list[IRNode], instance: str) -> ExecutionPlan:
        return ExecutionPlan(
            plan_id=plan.plan_id,
            graph=IRGraph(nodes=tuple(nodes)),
            request_ids=tuple(dict.fromkeys(c.request_id for n in nodes for c in n.chunks)),
            target_instance_id=instance,
        )

    return (
        plan_of(halves["prefill"], prefill_instance_id),
        plan_of(halves["decode"], decode_instance_id),
    )
