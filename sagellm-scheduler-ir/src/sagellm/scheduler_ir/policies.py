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
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from sagellm.core.types import (
    ExecutionPlan,
    IRGraph,
    IRNode,
    IRNodeKind,
    RequestStatus,
    SchedulerOutput,
)
from sagellm.scheduler_ir.config import (
    AdaptiveSchedulerConfig,
    FairSchedulerConfig,
    PDSchedulerConfig,
    PrioritySchedulerConfig,
    SLOSchedulerConfig,
)
from sagellm.scheduler_ir.cost import StepCostModel
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


class _CostAware(_PrefillCapped):
    """Shared machinery of ``slo`` and ``adaptive``: a step-cost model learned by
    :meth:`observe_step` and a per-step prefill budget chosen from it.

    With ``d`` requests decoding whose tightest TPOT objective is ``T``, prefill may take
    ``floor((T - a) / b) - d`` tokens, so the predicted step time ``a + b * tokens`` stays
    within ``T`` (Sarathi-Serve's stall-free batching, the budget derived from the learned
    model instead of fixed). Rules that keep the queue moving:

    - at least ``min_prefill_tokens`` (default one block) of prefill per step;
    - when even a decode-only step is predicted over ``T``, throttling cannot meet the
      objective and would only delay the queue: no cap (the full step budget);
    - when a request waiting for its first token would miss its TTFT objective at the
      capped rate but not at the full rate, the cap rises to the smallest chunk that meets
      that deadline (predicted by the model, requests served in the policy's order);
    - decodes of requests that already missed their TTFT (``_missed_ttft``) do not count.

    ``clock`` (context) returns seconds; it defaults to ``time.monotonic``, which is the
    clock of ``GenerationRequest.arrival_time``.
    """

    config: SLOSchedulerConfig | AdaptiveSchedulerConfig

    def __init__(
        self,
        config: SLOSchedulerConfig | AdaptiveSchedulerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        **context: Any,
    ) -> None:
        super().__init__(config, **context)
        self.clock = clock
        self.cost = StepCostModel(
            config.step_overhead_ms,
            config.per_token_ms,
            ewma=config.ewma,
            ref_tokens=config.max_num_batched_tokens,
        )
        self._now = 0.0
        self._missed_ttft: set[str] = set()  # first token came after the TTFT objective
        self._first_token_at: dict[str, float] = {}  # clock() when the first token came
        self._num_decodes = 0  # decoding requests this step
        self._default_ttft_ms: float | None = None
        self._default_tpot_ms: float | None = None

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """Refit the step-cost model with one step's wall time (optional engine hook)."""
        self.cost.observe(num_tokens, seconds)

    @property
    def per_token_ms(self) -> float:
        """The model's current cost of one more token (b)."""
        return self.cost.b_ms

    def _ttft_ms(self, state: RequestState) -> float | None:
        v = state.request.slo.ttft_ms
        return v if v is not None else self._default_ttft_ms

    def _tpot_ms(self, state: RequestState) -> float | None:
        v = state.request.slo.tpot_ms
        return v if v is not None else self._default_tpot_ms

    def _order_queue(self) -> None:
        """Put the waiting queue in service order for this step (FCFS: as it is)."""

    def _prefill_candidates(self) -> list[RequestState]:
        """Requests with prefill left, in the order this policy serves them."""
        out = [s for s in self._running if not _is_decoding(s)]
        out.extend(itertools.islice(self._waiting, self.config.max_num_seqs))
        return out

    def _begin_step(self) -> None:
        super()._begin_step()
        self._now = self.clock()
        self._order_queue()
        self._prefill_left = self.prefill_budget()

    def tpot_allowance_ms(self, state: RequestState) -> float | None:
        """Longest next step that keeps a decoding request's mean time per output token
        within its TPOT objective (None without one). Time banked by fast steps may be
        spent: the objective is a mean over the output, as TPOT is measured."""
        tpot = self._tpot_ms(state)
        if tpot is None:
            return None
        first = self._first_token_at.get(state.request_id)
        if first is None:
            return tpot
        num_output = len(state.token_ids) - len(state.request.prompt_token_ids)
        return tpot * num_output - (self._now - first) * 1000.0

    def prefill_budget(self) -> int | None:
        """Prefill tokens this step may compute (None: up to the step budget)."""
        decodes = [s for s in self._running if _is_decoding(s)]
        d = self._num_decodes = len(decodes)
        full = self._token_budget() - d
        if not decodes or full <= 0 or (not self._waiting and d == len(self._running)):
            return None
        # Decodes a smaller prefill can keep within their objective this step.
        decode_ms = self.cost.step_ms(d)
        allow = sorted(
            t
            for s in decodes
            if s.request_id not in self._missed_ttft
            and (t := self.tpot_allowance_ms(s)) is not None
            and t >= decode_ms
        )
        if not allow:
            return None  # infeasible (or nothing to protect): throttling only delays the queue
        floor = self.config.min_prefill_tokens or self.block_size
        base = max(floor, self.cost.tokens_within(allow[0]) - d)
        if base >= full:
            return None
        base = self._head_chunk(base, full, d)
        if base >= full:
            return None
        # Goodput trade: a larger chunk that lets k more waiting requests meet their TTFT
        # is taken when it puts fewer than k protected decodes over their allowance.
        best, best_gain = base, 0
        for k, chunk in enumerate(self._ttft_needs(base, full, d), start=1):
            at_risk = bisect.bisect_left(allow, self.cost.step_ms(chunk + d))
            if k - at_risk > best_gain:
                best, best_gain = chunk, k - at_risk
        return None if best >= full else best

    def _head_chunk(self, cap: int, full: int, num_decodes: int) -> int:
        """The prefill budget the head of the queue needs, at least ``cap`` (policies that
        never defer a late request override this)."""
        return cap

    def _chunk_for(self, pending: int, left_ms: float, lo: int, hi: int) -> int:
        """Smallest chunk in ``(lo, hi]`` computing ``pending`` tokens within ``left_ms``
        (``hi`` when none does); ``prefill_ms`` falls as the chunk grows."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.cost.prefill_ms(pending, mid, self._num_decodes) <= left_ms:
                hi = mid
            else:
                lo = mid
        return hi

    def _ttft_needs(self, cap: int, full: int, num_decodes: int) -> list[int]:
        """Sorted smallest chunks (in ``(cap, full]``) with which each request waiting for
        its first token meets its TTFT objective, for those that miss it at ``cap`` but not
        at ``full``; requests are served in the policy's order."""
        needs: list[int] = []
        pending = 0
        cost = self.cost
        for s in self._prefill_candidates():
            pending += len(s.token_ids) - s.num_computed_tokens
            if len(s.token_ids) > len(s.request.prompt_token_ids):
                continue  # recomputing after preemption: its first token is out already
            ttft = self._ttft_ms(s)
            if ttft is None:
                continue
            left_ms = (s.request.arrival_time - self._now) * 1000.0 + ttft
            if cost.prefill_ms(pending, cap, num_decodes) <= left_ms:
                continue
            if cost.prefill_ms(pending, full, num_decodes) > left_ms:
                continue  # misses even at the full rate: not worth the decodes' TPOT
            needs.append(self._chunk_for(pending, left_ms, cap, full))
        needs.sort()
        return needs

    def update_from_output(
        self, output: SchedulerOutput, sampled_token_ids: Mapping[str, Sequence[int]]
    ) -> None:
        first = [
            s
            for c in output.chunks
            if c.sample
            and (s := self._requests.get(c.request_id)) is not None
            and len(s.token_ids) == len(s.request.prompt_token_ids)
        ]
        super().update_from_output(output, sampled_token_ids)
        if first:
            now = self.clock()
            for s in first:
                self._first_token_at[s.request_id] = now
                ttft = self._ttft_ms(s)
                if ttft is not None and (now - s.request.arrival_time) * 1000.0 > ttft:
                    self._missed_ttft.add(s.request_id)

    def finish_requests(self, request_ids: Any, reason: Any) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        super().finish_requests(ids, reason)
        for rid in ids:
            self._missed_ttft.discard(rid)
            self._first_token_at.pop(rid, None)


class SLOScheduler(_CostAware):
    """Earliest TTFT deadline first, with the requests that would make others late deferred;
    decodes protected for TPOT.

    Each step ranks every request still waiting for its first token, running prefills
    included: preempted requests, which already have their first token, go first; then
    requests with a TTFT objective by deadline (arrival + objective); then requests without
    one (by arrival); last, with ``demote_missed``, the deferred ones. Deferral follows
    Moore and Hodgson's rule for the most deadlines met on one machine: walking the
    deadline order and estimating the time to prefill every request taken so far (their
    tokens in full-budget steps that also carry the running decodes, ``steps * a + b *
    tokens`` on the learned model), whenever that passes a deadline, the longest request
    taken so far is deferred. So
    a request that cannot meet its TTFT, or whose long prompt would make several short
    ones miss theirs, waits instead of delaying them; it still runs whenever the budget
    has room. Deferred requests' decodes no longer cap prefill.

    The order applies to prefill already under way: a running request still prefilling
    leaves the budget to better-ranked waiting requests (when the sequence cap and the
    free blocks let them in), keeping its blocks, so a short chat request is not stuck
    behind a long prompt's chunks. The prefill budget per step follows :class:`_CostAware`
    (TPOT of the running decodes, TTFT deadlines of the queue).
    """

    config_class: ClassVar[type[SLOSchedulerConfig]] = SLOSchedulerConfig
    config: SLOSchedulerConfig

    def __init__(self, config: SLOSchedulerConfig | None = None, **context: Any) -> None:
        cfg = config or SLOSchedulerConfig()
        super().__init__(cfg, **context)
        self._default_ttft_ms = cfg.default_ttft_ms
        self._default_tpot_ms = cfg.default_tpot_ms
        self._reserve: dict[str, int] = {}  # running prefill -> tokens it leaves to the queue
        self._keys: dict[str, tuple[int, float, float]] = {}  # this step's ranks

    def estimate_ms(self, num_tokens: int, num_decodes: int = 0) -> float:
        """Estimated time to compute ``num_tokens`` of one request's prefill, each step
        also computing ``num_decodes`` decodes."""
        chunk = max(1, self.config.max_num_batched_tokens - num_decodes)
        return self.cost.prefill_ms(num_tokens, chunk, num_decodes)

    def slack_ms(self, state: RequestState, now: float | None = None) -> float:
        """TTFT slack of a request still prefilling, were it served alone (inf without an
        objective)."""
        ttft = self._ttft_ms(state)
        if ttft is None:
            return math.inf
        now = self.clock() if now is None else now
        remaining = len(state.token_ids) - state.num_computed_tokens
        deadline_ms = (state.request.arrival_time - now) * 1000.0 + ttft
        return deadline_ms - self.estimate_ms(remaining)

    def _rank(self, states: list[RequestState], num_decodes: int) -> None:
        """Fill ``_keys`` for ``states`` (all prefilling): (class, deadline, arrival)."""
        keys = self._keys = {}
        timed: list[tuple[float, float, int, RequestState]] = []
        pending = 0  # prompt tokens ranked ahead
        for i, s in enumerate(states):
            arrival = s.request.arrival_time
            ttft = self._ttft_ms(s)
            if len(s.token_ids) > len(s.request.prompt_token_ids):
                keys[s.request_id] = (0, 0.0, arrival)  # preempted after its first token
                pending += len(s.token_ids) - s.num_computed_tokens
            elif ttft is None:
                keys[s.request_id] = (2, 0.0, arrival)
            else:
                deadline = (arrival - self._now) * 1000.0 + ttft
                timed.append((deadline, arrival, i, s))
        timed.sort(key=lambda t: t[:3])
        deferred: set[int] = set()
        if self.config.demote_missed:
            # Requests share steps, so the time to serve a set is that of its total tokens.
            chunk = max(1, self.config.max_num_batched_tokens - num_decodes)
            taken: list[tuple[int, int]] = []  # max-heap of (-tokens, index)
            for deadline, _, i, s in timed:
                n = len(s.token_ids) - s.num_computed_tokens
                heapq.heappush(taken, (-n, i))
                pending += n
                if self.cost.prefill_ms(pending, chunk, num_decodes) > deadline:
                    neg, j = heapq.heappop(taken)
                    pending += neg
                    deferred.add(j)
        for deadline, arrival, i, s in timed:
            keys[s.request_id] = (3, deadline, arrival) if i in deferred else (1, deadline, arrival)

    def _key(self, state: RequestState) -> tuple[int, float, float]:
        return self._keys.get(state.request_id, (0, 0.0, state.request.arrival_time))

    def _order_queue(self) -> None:
        # Deadlines move with time only, so one ranking per step orders the queue; requests
        # preempted during the step go to the front (they rank first anyway).
        self._reserve = {}
        self._keys = {}
        if not self._waiting:
            return
        prefilling = [s for s in self._running if not _is_decoding(s)]
        num_decodes = len(self._running) - len(prefilling)
        self._rank(prefilling + list(self._waiting), num_decodes)
        ranked = sorted(((self._key(s), s) for s in self._waiting), key=lambda p: p[0])
        self._waiting = deque(s for _, s in ranked)
        slots = self.config.max_num_seqs - len(self._running)
        if not prefilling or slots <= 0:
            return
        # Budget a running prefill leaves to the better-ranked waiting requests that can
        # get in this step (a free sequence slot and free blocks for their whole prompt).
        keys: list[tuple[int, float, float]] = []
        tokens: list[int] = []
        free_blocks = self.pool.num_free_blocks
        total = 0
        for key, s in ranked[:slots]:
            n = len(s.token_ids) - s.num_computed_tokens
            free_blocks -= -(-(n + 1) // self.block_size)
            if free_blocks < 0:
                break
            total += n
            keys.append(key)
            tokens.append(total)
        for s in prefilling:
            j = bisect.bisect_left(keys, self._key(s))
            if j:
                self._reserve[s.request_id] = tokens[j - 1]

    def _prefill_candidates(self) -> list[RequestState]:
        out = [s for s in self._running if not _is_decoding(s)]
        out.extend(itertools.islice(self._waiting, self.config.max_num_seqs))
        out.sort(key=self._key)
        return out

    def _chunk_len(self, state: RequestState, budget: int) -> int:
        n = super()._chunk_len(state, budget)
        reserve = self._reserve.get(state.request_id)
        if reserve and state.status is RequestStatus.RUNNING:
            room = budget if self._prefill_left is None else min(budget, self._prefill_left)
            n = min(n, max(0, room - reserve))
        return n


class AdaptiveScheduler(_CostAware):
    """FCFS with decodes first and a prefill budget per step chosen from a step-cost model.

    :meth:`observe_step` fits step time ``a + b * tokens`` to the engine's timings; each
    step, prefill takes as many tokens as keep the predicted step time within the tightest
    TPOT objective of the decoding requests (``slo.tpot_ms``, else ``target_tpot_ms``),
    never less than ``min_prefill_tokens``, without a cap when the objective is infeasible
    even for a decode-only step, and more when a waiting request would otherwise miss its
    TTFT objective (``slo.ttft_ms``, else ``target_ttft_ms``); see :class:`_CostAware`.
    Without decodes, prefill takes the whole step budget. Order of service is FCFS.
    """

    config_class: ClassVar[type[AdaptiveSchedulerConfig]] = AdaptiveSchedulerConfig
    config: AdaptiveSchedulerConfig

    def __init__(self, config: AdaptiveSchedulerConfig | None = None, **context: Any) -> None:
        cfg = config or AdaptiveSchedulerConfig()
        super().__init__(cfg, **context)
        self._default_ttft_ms = cfg.target_ttft_ms
        self._default_tpot_ms = cfg.target_tpot_ms

    def _head_chunk(self, cap: int, full: int, num_decodes: int) -> int:
        # In arrival order a late head holds up every request behind it: once its TTFT
        # slack runs out at ``cap``, it gets the chunk that still meets its objective, or
        # the full budget when none does (so an overload drains instead of piling up).
        pending = 0
        for s in self._prefill_candidates():
            pending += len(s.token_ids) - s.num_computed_tokens
            ttft = self._ttft_ms(s)
            if ttft is None or len(s.token_ids) > len(s.request.prompt_token_ids):
                continue
            left_ms = (s.request.arrival_time - self._now) * 1000.0 + ttft
            if self.cost.prefill_ms(pending, cap, num_decodes) <= left_ms:
                return cap
            return self._chunk_for(pending, left_ms, cap, full)
        return cap


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
