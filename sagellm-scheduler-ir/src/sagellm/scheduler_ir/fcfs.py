"""First-come-first-served continuous batching (vLLM v1's rule)."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sagellm.core.errors import InvalidRequestError
from sagellm.core.telemetry import SchedulerStats
from sagellm.core.types import (
    ExecutionPlan,
    FinishReason,
    GenerationRequest,
    PrefixMatch,
    RequestStatus,
    ScheduledChunk,
    SchedulerOutput,
)
from sagellm.scheduler_ir.config import FCFSSchedulerConfig
from sagellm.scheduler_ir.ir import IRBuilder

__all__ = ["FCFSScheduler", "RequestState"]


@dataclass(slots=True, eq=False)
class RequestState:
    """A request as the scheduler tracks it."""

    request: GenerationRequest
    token_ids: list[int]  # prompt followed by the output tokens appended so far
    num_computed_tokens: int = 0  # tokens whose KV is in the request's blocks
    block_ids: list[int] = field(default_factory=list)  # block table, append-only while running
    status: RequestStatus = RequestStatus.WAITING
    prefix_match: PrefixMatch | None = None  # locked prefix-cache hit, released on finish/preempt
    num_indexed_blocks: int = 0  # leading full blocks already offered to the prefix index
    # tokens whose KV arrived computed elsewhere (add_prefilled_request): the blocks are
    # kept while the request waits; a preemption drops them like any other
    num_external_tokens: int = 0
    num_preemptions: int = 0
    draft_token_ids: list[int] = field(default_factory=list)  # speculative tokens to verify

    @property
    def request_id(self) -> str:
        return self.request.request_id


class FCFSScheduler:
    """Continuous batching in arrival order under a token budget and a sequence cap.

    Every step, running requests come first (in admission order), each catching its
    ``num_computed_tokens`` up with its tokens within the remaining budget; waiting
    requests are then admitted in arrival order while the budget, the sequence cap and the
    pool allow. There is no prefill or decode phase: a long prompt is simply computed in
    budget-sized chunks. Full blocks are offered to the prefix index (if any) as they are
    computed, except for requests with ``skip_prefix_cache``, which also never start from a
    cached prefix; their blocks return to the pool when they end. When the pool is full
    the prefix index is asked to evict, then the most recently admitted running request is
    preempted by recompute: its blocks are released and it returns to the front of the
    queue, keeping its output tokens.
    """

    config_class: ClassVar[type[FCFSSchedulerConfig]] = FCFSSchedulerConfig

    def __init__(
        self,
        config: FCFSSchedulerConfig | None = None,
        *,
        kv_pool: Any,
        max_model_len: int,
        prefix_index: Any = None,
        tiered_store: Any = None,
    ) -> None:
        self.config = config or FCFSSchedulerConfig()
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        self.pool = kv_pool
        self.prefix_index = prefix_index
        self.tiered_store = tiered_store
        self.max_model_len = max_model_len
        self.block_size: int = kv_pool.schema.block_size
        self.ir_builder = IRBuilder()
        self._requests: dict[str, RequestState] = {}
        self._waiting: deque[RequestState] = deque()
        self._running: list[RequestState] = []
        self._finished_ids: list[str] = []
        self._overflow: deque[RequestState] = deque()  # held back by admission control
        self._rejected_ids: list[str] = []  # refused by admission control, reported next step
        self._queue_tokens = 0  # prompt tokens of the waiting requests
        self._step_id = 0
        self._stats = SchedulerStats()

    # ------------------------------------------------------------------ queue

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._overflow)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running or self._overflow or self._rejected_ids)

    def set_draft_tokens(self, drafts: Mapping[str, Sequence[int]]) -> None:
        """Speculative tokens for the next ``schedule()`` (the engine's proposer made them).

        A running request whose tokens are all computed but the last one gets its chunk
        extended by as many drafts as the step's budget, its blocks and the context
        allow; they count against the token budget like any other token. Drafts of
        requests that are unknown, waiting or still prefilling are ignored, and drafts
        not scheduled by the next step are dropped.
        """
        for rid, tokens in drafts.items():
            state = self._requests.get(rid)
            if state is not None and state.status is RequestStatus.RUNNING:
                state.draft_token_ids = [int(t) for t in tokens]

    def get_request(self, request_id: str) -> RequestState | None:
        """The tracked state of a live request (None when unknown or finished)."""
        return self._requests.get(request_id)

    def _check_new(self, request: GenerationRequest) -> None:
        rid = request.request_id
        if rid in self._requests:
            raise InvalidRequestError(
                f"request id {rid!r} is already live; use a unique id per request"
            )
        n = len(request.prompt_token_ids)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt of request {rid!r} has {n} tokens but the context holds "
                f"{self.max_model_len} (prompt plus at least one output token): "
                "shorten the prompt or raise max_model_len"
            )
        need = -(-(n + 1) // self.block_size)
        if need > self.pool.num_blocks:
            raise InvalidRequestError(
                f"prompt of request {rid!r} needs {need} KV blocks but the pool has "
                f"{self.pool.num_blocks}: shorten the prompt or give the KV pool more memory"
            )

    def add_request(self, request: GenerationRequest) -> None:
        self._check_new(request)
        rid = request.request_id
        state = RequestState(request=request, token_ids=list(request.prompt_token_ids))
        if self._overflow or not self._can_queue(state):
            if self.config.admission == "reject":
                self._rejected_ids.append(rid)
                self._stats.num_rejected += 1
                return
            self._requests[rid] = state
            self._overflow.append(state)
            return
        self._requests[rid] = state
        self._enqueue(state)

    def add_prefilled_request(
        self, request: GenerationRequest, block_ids: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Queue a request whose first ``num_computed_tokens`` prompt tokens already have
        their KV in ``block_ids`` (computed by another instance and transferred here).

        The scheduler takes over the caller's reference to each block. The request is
        queued like any other (the policy orders it; admission control does not hold it
        back, since its prompt is already computed) and, once admitted, computes only its
        remaining tokens, at least the last prompt token, whose logits give the first
        output token. Its full blocks reach the prefix index as they would after a local
        prefill. A preemption releases the blocks and recomputes locally.

        Raises InvalidRequestError as :meth:`add_request` does, and when the blocks do
        not hold exactly ``num_computed_tokens`` positions or leave no prompt token to
        compute; nothing is queued then and the caller still owns the blocks.
        """
        self._check_new(request)
        n = len(request.prompt_token_ids)
        bs = self.block_size
        if not 0 < num_computed_tokens < n:
            raise InvalidRequestError(
                f"request {request.request_id!r}: {num_computed_tokens} computed tokens for a "
                f"prompt of {n}; give 1..{n - 1} (the last prompt token is computed here)"
            )
        if len(block_ids) != -(-num_computed_tokens // bs):
            raise InvalidRequestError(
                f"request {request.request_id!r}: {len(block_ids)} block(s) cannot hold "
                f"exactly {num_computed_tokens} tokens in blocks of {bs}; give "
                f"{-(-num_computed_tokens // bs)}"
            )
        state = RequestState(
            request=request,
            token_ids=list(request.prompt_token_ids),
            num_computed_tokens=num_computed_tokens,
            block_ids=[int(b) for b in block_ids],
            num_external_tokens=num_computed_tokens,
        )
        self._requests[request.request_id] = state
        self._enqueue(state)
        self._stats.num_external_tokens += num_computed_tokens

    # ------------------------------------------------------------------ policy hooks
    # Subclasses change the order of service through these methods; the step logic
    # (budgets, allocation, preemption, chunking) stays in one place.

    def _can_queue(self, state: RequestState) -> bool:
        """Admission control: True when ``state`` fits the waiting-queue limits."""
        cfg = self.config
        if cfg.max_waiting and len(self._waiting) >= cfg.max_waiting:
            return False
        n = len(state.token_ids)
        return not (
            cfg.max_queue_tokens and self._waiting and self._queue_tokens + n > cfg.max_queue_tokens
        )

    def _enqueue(self, state: RequestState) -> None:
        """Put a newly added request into the waiting queue."""
        self._waiting.append(state)
        self._queue_tokens += len(state.token_ids)

    def _requeue(self, state: RequestState) -> None:
        """Put a preempted request back into the waiting queue (FCFS: at the front)."""
        self._waiting.appendleft(state)
        self._queue_tokens += len(state.token_ids)

    def _peek_waiting(self) -> RequestState:
        """The waiting request to admit next (the queue is not empty)."""
        return self._waiting[0]

    def _remove_waiting(self, state: RequestState) -> None:
        if self._waiting and self._waiting[0] is state:
            self._waiting.popleft()
        else:
            self._waiting.remove(state)
        self._queue_tokens -= len(state.token_ids)

    def _insert_running(self, state: RequestState) -> None:
        """Add an admitted request to the running list (FCFS: at the tail)."""
        self._running.append(state)

    def _admission_victim(self, state: RequestState) -> RequestState | None:
        """A running request that waiting ``state`` may preempt when the sequence cap is hit
        or the pool is full; None (FCFS) never preempts for admission."""
        return None

    def _token_budget(self) -> int:
        """Tokens this step may compute."""
        return self.config.max_num_batched_tokens

    def _can_admit(self, state: RequestState) -> bool:
        """False stops admission for this step before ``state`` (the sequence cap and the
        pool are checked separately)."""
        return True

    def _begin_step(self) -> None:
        """Called at the start of every ``schedule()``; policies refresh their state here."""

    def _drain_overflow(self) -> None:
        while self._overflow and self._can_queue(self._overflow[0]):
            self._enqueue(self._overflow.popleft())

    # ------------------------------------------------------------------ blocks

    def _blocks_needed(self, state: RequestState, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size) - len(state.block_ids)

    def _evict_from_index(self, num_blocks: int) -> bool:
        """Ask the prefix index to release ``num_blocks``; True when any block became free."""
        if self.prefix_index is None or num_blocks <= 0:
            return False
        before = self.pool.num_free_blocks
        target = before + num_blocks
        # An evicted block that a running request still holds frees nothing: ask again
        # until enough blocks are free or the index has nothing left to give.
        while self.pool.num_free_blocks < target:
            released = self.prefix_index.evict(target - self.pool.num_free_blocks)
            if not released:
                break
            self.pool.free(released)
        return self.pool.num_free_blocks > before

    def _allocate(self, state: RequestState, num_tokens: int) -> bool:
        """Grow ``state``'s block table to hold ``num_tokens``; False when the pool is full."""
        need = self._blocks_needed(state, num_tokens)
        if need <= 0:
            return True
        new = self.pool.allocate(need)
        if new is None and self._evict_from_index(need - self.pool.num_free_blocks):
            new = self.pool.allocate(need)
        if new is None:
            return False
        state.block_ids.extend(new)
        return True

    def _release(self, state: RequestState) -> None:
        if state.block_ids:
            self.pool.free(state.block_ids)
            state.block_ids = []
        if state.prefix_match is not None:
            self.prefix_index.unlock(state.prefix_match)
            state.prefix_match = None
        state.num_computed_tokens = 0
        state.num_indexed_blocks = 0
        state.num_external_tokens = 0

    def _unadmit(self, state: RequestState) -> None:
        """Undo an admission attempt: drop a prefix match (its blocks were only shared
        for this step); a prefilled request keeps the KV it brought."""
        if not state.num_external_tokens:
            self._release(state)

    def _preempt(self, state: RequestState) -> None:
        self._release(state)
        state.draft_token_ids = []  # recomputed from scratch: no decode chunk to extend
        state.status = RequestStatus.PREEMPTED
        state.num_preemptions += 1
        self._requeue(state)
        self._stats.num_preemptions += 1

    def _match_prefix(self, state: RequestState) -> None:
        """Start a fresh request from its longest cached prefix (never its last token)."""
        if (
            self.prefix_index is None
            or state.num_computed_tokens
            or state.request.skip_prefix_cache
        ):
            return
        match = self.prefix_index.match(state.token_ids[:-1], state.request.isolation_key)
        if not match.hit:
            return
        self.prefix_index.lock(match)
        self.pool.share(match.block_ids)
        state.prefix_match = match
        state.block_ids = list(match.block_ids)
        state.num_computed_tokens = match.num_tokens

    # ------------------------------------------------------------------ step

    def _chunk_len(self, state: RequestState, budget: int) -> int:
        n = len(state.token_ids) - state.num_computed_tokens
        cap = self.config.long_prefill_token_threshold
        if cap and n > cap:
            n = cap
        return min(n, budget)

    def _num_drafts(self, state: RequestState, num_new: int, budget: int) -> int:
        """Drafts to verify with a chunk of ``num_new`` tokens: only a decode (the chunk is
        the last token) takes them, within the budget and the context."""
        if (
            not state.draft_token_ids
            or state.num_computed_tokens + num_new != len(state.token_ids)
            or num_new != 1
        ):
            return 0
        # the bonus token after the last draft must still fit in the context
        room = self.max_model_len - len(state.token_ids) - 1
        return max(0, min(len(state.draft_token_ids), budget - num_new, room))

    def _chunk(self, state: RequestState, num_new: int) -> ScheduledChunk:
        start = state.num_computed_tokens
        end = start + num_new
        return ScheduledChunk(
            request_id=state.request_id,
            token_ids=tuple(state.token_ids[start:end]),
            num_computed_tokens=start,
            block_ids=tuple(state.block_ids),
            sample=end == len(state.token_ids),
            is_prefill=start < len(state.token_ids) - 1,
        )

    @staticmethod
    def _with_drafts(state: RequestState, chunk: ScheduledChunk, num_drafts: int) -> ScheduledChunk:
        if not num_drafts:
            return chunk
        drafts = tuple(state.draft_token_ids[:num_drafts])
        return dataclasses.replace(
            chunk,
            token_ids=chunk.token_ids + drafts,
            block_ids=tuple(state.block_ids),
            num_draft_tokens=len(drafts),
        )

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        self._drain_overflow()
        self._begin_step()
        total = budget = self._token_budget()

        # Running requests first; a victim is always taken from the tail, which has not
        # been scheduled yet in this step, so chunks already emitted stay valid.
        i = 0
        while i < len(self._running) and budget > 0:
            state = self._running[i]
            num_new = self._chunk_len(state, budget)
            if num_new <= 0:
                i += 1
                continue
            num_drafts = self._num_drafts(state, num_new, budget)
            # Drafts take blocks only when free ones exist: they never cause a preemption.
            if num_drafts and not self._allocate(
                state, state.num_computed_tokens + num_new + num_drafts
            ):
                num_drafts = 0
            scheduled = True
            while not self._allocate(state, state.num_computed_tokens + num_new):
                victim = self._running.pop()  # the tail: not yet scheduled in this step
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is state:
                    scheduled = False
                    break
            if not scheduled:
                break
            chunks.append(self._with_drafts(state, self._chunk(state, num_new), num_drafts))
            budget -= num_new + num_drafts
            i += 1

        # Admit waiting requests in the policy's order (no admission in a step whose running
        # pass preempted: the pool is known to be short).
        hit_tokens = 0
        short = bool(preempted)  # fixed before admission may preempt for a better request
        while not short and self._waiting and budget > 0:
            state = self._peek_waiting()
            if not self._can_admit(state):
                break
            if len(self._running) >= cfg.max_num_seqs:
                rival = self._admission_victim(state)
                if rival is None:
                    break
                budget += self._preempt_running(rival, chunks)
                preempted.append(rival.request_id)
                continue
            self._match_prefix(state)
            remaining = len(state.token_ids) - state.num_computed_tokens
            if not cfg.enable_chunked_prefill and remaining > budget:
                self._unadmit(state)
                break
            num_new = self._chunk_len(state, budget)
            if num_new <= 0:  # a policy's cap left no room for this request
                self._unadmit(state)
                break
            if not self._allocate(state, state.num_computed_tokens + num_new):
                self._unadmit(state)
                rival = self._admission_victim(state)
                if rival is None:
                    break
                budget += self._preempt_running(rival, chunks)
                preempted.append(rival.request_id)
                continue
            self._remove_waiting(state)
            if state.prefix_match is not None:
                hit_tokens += state.prefix_match.num_tokens
            state.status = RequestStatus.RUNNING
            self._insert_running(state)
            chunks.append(self._chunk(state, num_new))
            budget -= num_new

        for state in self._running:
            state.draft_token_ids = []
        # Prefill chunks first, then decodes (stable), so the IR has one node of each kind.
        chunks.sort(key=lambda c: not c.is_prefill)
        num_tokens = total - budget
        self._step_id += 1
        finished, self._finished_ids = tuple(self._finished_ids), []
        rejected, self._rejected_ids = tuple(self._rejected_ids), []
        st = self._stats
        st.num_steps += 1
        st.num_scheduled_tokens += num_tokens
        st.num_prefix_hit_tokens += hit_tokens
        return SchedulerOutput(
            step_id=self._step_id,
            chunks=tuple(chunks),
            num_scheduled_tokens=num_tokens,
            preempted_request_ids=tuple(preempted),
            finished_request_ids=finished,
            rejected_request_ids=rejected,
            num_waiting=self.num_waiting,
            num_running=len(self._running),
        )

    def _preempt_running(self, victim: RequestState, chunks: list[ScheduledChunk]) -> int:
        """Preempt a running request for admission; drop its chunk of this step (its blocks
        are released) and return the tokens that chunk had taken from the budget."""
        refund = 0
        for k, c in enumerate(chunks):
            if c.request_id == victim.request_id:
                refund = len(c.token_ids)  # drafts included
                del chunks[k]
                break
        self._running.remove(victim)
        self._preempt(victim)
        return refund

    def build_plan(self, output: SchedulerOutput) -> ExecutionPlan:
        return self.ir_builder.build(output)

    def update_from_output(
        self, output: SchedulerOutput, sampled_token_ids: Mapping[str, Sequence[int]]
    ) -> None:
        for chunk in output.chunks:
            state = self._requests.get(chunk.request_id)
            if state is None or state.status is not RequestStatus.RUNNING:
                continue  # finished or aborted while the step ran
            if chunk.num_draft_tokens:
                self._accept_drafts(state, chunk, sampled_token_ids[chunk.request_id])
            else:
                state.num_computed_tokens = chunk.num_computed_tokens + len(chunk.token_ids)
                if chunk.sample:
                    state.token_ids.extend(sampled_token_ids[chunk.request_id])
            if self.prefix_index is not None and not state.request.skip_prefix_cache:
                self._index_full_blocks(state)

    def _accept_drafts(
        self, state: RequestState, chunk: ScheduledChunk, emitted: Sequence[int]
    ) -> None:
        """Keep the verified drafts and roll the rest back.

        ``emitted`` is the accepted drafts followed by one token of the target's own. The
        KV of the last token and of the accepted drafts is valid; what was written for
        rejected drafts sits in slots past ``num_computed_tokens``, which the next step
        overwrites, and blocks holding nothing but such slots go back to the pool. The
        prefix index only ever sees blocks below ``num_computed_tokens``.
        """
        num_drafts = chunk.num_draft_tokens
        accepted = len(emitted) - 1
        if not 0 <= accepted <= num_drafts or list(emitted[:accepted]) != list(
            chunk.token_ids[1 : 1 + accepted]
        ):
            raise ValueError(
                f"request {chunk.request_id!r}: {list(emitted)} is not an accepted prefix of "
                f"the drafts {list(chunk.token_ids[1:])} followed by one token"
            )
        state.num_computed_tokens = chunk.num_computed_tokens + 1 + accepted
        state.token_ids.extend(emitted)
        # blocks needed for the tokens now known (the newest one is computed next step)
        keep = -(-len(state.token_ids) // self.block_size)
        if len(state.block_ids) > keep:
            self.pool.free(state.block_ids[keep:])
            del state.block_ids[keep:]

    def _index_full_blocks(self, state: RequestState) -> None:
        num_full = state.num_computed_tokens // self.block_size
        if num_full <= state.num_indexed_blocks:
            return
        taken = self.prefix_index.insert(
            state.token_ids[: num_full * self.block_size],
            state.block_ids[:num_full],
            state.request.isolation_key,
        )
        if taken:
            self.pool.share(taken)
        state.num_indexed_blocks = num_full

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            state = self._requests.pop(rid, None)
            if state is None:
                continue
            if state.status is RequestStatus.RUNNING:
                self._running.remove(state)
            elif state in self._overflow:
                self._overflow.remove(state)
            else:
                self._remove_waiting(state)
            self._release(state)
            state.status = RequestStatus.FINISHED
            self._finished_ids.append(rid)
            if reason is FinishReason.REJECTED:
                self._stats.num_rejected += 1

    def make_stats(self) -> SchedulerStats:
        st = self._stats
        st.num_waiting = len(self._waiting) + len(self._overflow)
        st.num_running = len(self._running)
        self._stats = SchedulerStats()
        return st
