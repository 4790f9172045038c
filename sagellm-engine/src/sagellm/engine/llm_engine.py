"""The synchronous engine loop.

One :meth:`LLMEngine.step` is: ``scheduler.schedule()`` -> ``scheduler.build_plan()`` ->
``runtime.execute()`` -> sampler -> ``scheduler.update_from_output()`` -> stop checks ->
``scheduler.finish_requests()``. The scheduler owns admission, blocks and preemption; the
engine owns everything that needs tokens or text: sampling, detokenization and the stop
conditions (end of sequence, stop tokens, stop strings, ``max_tokens``, context length).

A request with ``n > 1`` becomes ``n`` sub-requests with their own seeds; their outputs are
merged back into one :class:`RequestOutput` with ``n`` completions.

A structured output (``sampling.structured_output``, :mod:`sagellm.engine.structured`) is
compiled when the request is added and gives each sub-request its own grammar matcher; the
sampler masks that row's logits, every appended token advances the matcher once, and a
matcher that completes finishes the sub-request ("stop"). Constrained sub-requests get no
speculative drafts.

An embedding request (``pooling=``) is a prompt the scheduler batches like any other; the
runtime returns the final-norm hidden states of its rows, which are pooled (last token or
mean) instead of sampled, and the request finishes with the chunk that completes its
prompt. ``prompt_logprobs=k`` asks the runtime for the logits of every prompt row and
returns each prompt token's logprob with the top ``k``, in every output from the one of
the first token on. Both kinds compute every prompt row, so they reach the scheduler with
``skip_prefix_cache``: they never start from a cached prefix and none of their blocks is
offered to the prefix index, so every block they held is free again when they end, however
many chunks their prompt took. A cache salt of their own also keeps them from matching
another request's prefix under a scheduler that ignores the flag.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sagellm.core.config import EngineConfig
from sagellm.core.errors import CapabilityMismatchError, InvalidRequestError
from sagellm.core.protocols import KVMigrator
from sagellm.core.types import (
    SLO,
    CompletionOutput,
    DraftRequest,
    ExecutionPlan,
    FinishReason,
    GenerationRequest,
    IRNodeKind,
    RequestKind,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
)
from sagellm.engine.builder import EngineBuilder, EngineParts
from sagellm.engine.config import BuildOptions
from sagellm.engine.cot import CoTHooks, CoTOptions
from sagellm.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from sagellm.engine.disagg import KVTransferHooks, KVTransferSettings
from sagellm.engine.metrics import EngineStats
from sagellm.engine.replay import RealClock
from sagellm.engine.sampler import Sampler, SamplingRow, mix_seed
from sagellm.engine.speculation import SpeculativeDecoder, SpeculativeSettings
from sagellm.engine.structured import GrammarState, StructuredOutputs, structured_output_of

__all__ = ["EngineRequestOutput", "LLMEngine", "PoolingParams", "Prompt", "PromptLogprob"]

logger = logging.getLogger(__name__)

#: A prompt as callers give it: text, or token ids.
Prompt = str | Sequence[int]

#: Tokens a step emitted for one request, with their logprobs and top-logprob entries.
_Emitted = tuple[list[int], list[float | None], list[dict[int, float] | None]]


@dataclass(frozen=True, slots=True)
class PoolingParams:
    """How an embedding request turns its prompt's hidden states into one vector."""

    pooling: Literal["last", "mean"] = "last"  # the last token's state, or the mean of all
    normalize: bool = True  # scale the vector to unit L2 norm


@dataclass(frozen=True, slots=True)
class PromptLogprob:
    """A prompt token's logprob (of the model's raw distribution) and its rank."""

    logprob: float
    rank: int  # 1: the most likely token


@dataclass(slots=True)
class EngineRequestOutput(RequestOutput):
    """A :class:`RequestOutput` with what only some requests carry."""

    # prompt_logprobs=k: per prompt position, None for the first, else token id -> logprob
    # of the prompt token and of the k most likely ones; set in every output from the one
    # of the first token on (with n > 1: completion 0's first token)
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    embedding: list[float] | None = None  # pooled hidden state of an embedding request
    # a kv_producer's offer of the prompt's KV (vLLM's kv_transfer_params): hand it to
    # the decode instance with the same prompt; set in the final output
    kv_transfer_params: dict[str, Any] | None = None


@dataclass
class _Sequence:
    """Engine-side state of one sub-request (one of the ``n`` continuations)."""

    request_id: str  # id the scheduler knows
    parent: _Request
    index: int  # position among the parent's n completions
    seed: int
    sampling: SamplingParams  # the parent's, with n=1
    detokenizer: IncrementalDetokenizer | None
    stop_matcher: StopStringMatcher
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    text: str = ""
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    grammar: GrammarState | None = None  # the matcher of a structured output
    pooled: Any = None  # an embedding request's running sum (mean) or last row (last)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def completion(self) -> CompletionOutput:
        """The continuation as callers see it; a possible stop-string prefix is held back."""
        text = self.text
        if not self.finished:
            held = self.stop_matcher.holdback(text)
            if held:
                text = text[:-held]
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=list(self.output_token_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            cumulative_logprob=self.cumulative_logprob,
        )


@dataclass
class _Request:
    """A caller's request and its sub-requests."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    sequences: list[_Sequence] = field(default_factory=list)
    consistency: Any = None  # CoTVote of a self-consistent request
    pooling: PoolingParams | None = None  # an embedding request
    embedding: list[float] | None = None  # set when an embedding request finishes
    num_prompt_logprobs: int | None = None  # prompt_logprobs=k
    prompt_logprobs: dict[int, dict[int, PromptLogprob]] = field(default_factory=dict)
    # the caller's list of prompt logprobs, built once every position has its entry
    prompt_logprobs_list: list[dict[int, PromptLogprob] | None] | None = None
    kv_offer: bool = False  # kv_producer: offer the prompt's KV when the request finishes
    kv_transfer_params: dict[str, Any] | None = None  # the offer made

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)

    @property
    def prompt_logprobs_done(self) -> bool:
        """True once every prompt position after the first has its logprobs."""
        return len(self.prompt_logprobs) >= len(self.prompt_token_ids) - 1

    def _prompt_logprobs_output(self) -> list[dict[int, PromptLogprob] | None] | None:
        """Per prompt position, None for the first; None before every position has its
        entry (they all have it by the step that samples the first token, the request's
        first output), and when the request ends earlier the positions it recorded."""
        if self.num_prompt_logprobs is None:
            return None
        if self.prompt_logprobs_list is None:
            if not (self.prompt_logprobs_done or self.finished):
                return None
            got = self.prompt_logprobs
            built = [None] + [got.get(p) for p in range(1, len(self.prompt_token_ids))]
            if not self.prompt_logprobs_done:
                return built  # ended early (an abort): the missing positions stay None
            self.prompt_logprobs_list = built
        return list(self.prompt_logprobs_list)

    def output(self) -> RequestOutput:
        seqs = self.sequences
        metrics = RequestMetrics(
            arrival_time=self.arrival_time,
            num_prompt_tokens=len(self.prompt_token_ids),
        )
        firsts = [s.metrics.first_scheduled_time for s in seqs if s.metrics.first_scheduled_time]
        metrics.first_scheduled_time = min(firsts) if firsts else None
        tokens = [s.metrics.first_token_time for s in seqs if s.metrics.first_token_time]
        metrics.first_token_time = min(tokens) if tokens else None
        if self.finished:
            ends = [s.metrics.finished_time for s in seqs if s.metrics.finished_time]
            metrics.finished_time = max(ends) if ends else None
        metrics.num_cached_tokens = max(s.metrics.num_cached_tokens for s in seqs)
        metrics.num_output_tokens = sum(len(s.output_token_ids) for s in seqs)
        metrics.num_preemptions = sum(s.metrics.num_preemptions for s in seqs)
        return EngineRequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[] if self.pooling is not None else [s.completion() for s in seqs],
            finished=self.finished,
            metrics=metrics,
            consistency=self.consistency,
            prompt_logprobs=self._prompt_logprobs_output(),
            embedding=self.embedding,
            kv_transfer_params=self.kv_transfer_params,
        )


class LLMEngine:
    """Runs requests to completion one scheduler step at a time.

    Usage::

        engine = LLMEngine.from_config(load_engine_config(overrides={"model": "smollm2-135m"}))
        engine.add_request("r1", "The capital of France is", SamplingParams(max_tokens=8))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    print(out.outputs[0].text)
    """

    def __init__(
        self,
        parts: EngineParts,
        *,
        speculative_config: str | Mapping[str, Any] | SpeculativeSettings | None = None,
        kv_transfer_config: str | Mapping[str, Any] | KVTransferSettings | None = None,
        clock: RealClock | None = None,
    ) -> None:
        self.parts = parts
        self.config: EngineConfig = parts.config
        self.runtime = parts.runtime
        self.kv_pool = parts.kv_pool
        self.scheduler = parts.scheduler
        self._observe_step = getattr(self.scheduler, "observe_step", None)
        self.clock = clock or RealClock()  # time of arrivals, tokens and steps (engine.replay)
        if clock is not None and hasattr(self.scheduler, "clock"):
            self.scheduler.clock = clock.now
        self.tokenizer = parts.tokenizer
        self.max_model_len = parts.max_model_len
        self.model_name = parts.model_name
        self.sampler = Sampler()
        self.eos_token_ids = self._eos_token_ids()
        self.vocab_size = self._vocab_size()
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._seed_rng = random.Random(self.config.seed)
        self._requests: dict[str, _Request] = {}  # by caller id
        self._sequences: dict[str, _Sequence] = {}  # by scheduler id
        self._stats = EngineStats()
        self._auto_ids = itertools.count()
        self.last_step_num_tokens = 0  # tokens the latest step computed (0: it was idle)
        self.speculative: SpeculativeDecoder | None = None
        if speculative_config is not None:
            settings = SpeculativeSettings.parse(speculative_config)
            if not callable(getattr(self.scheduler, "set_draft_tokens", None)):
                raise CapabilityMismatchError(
                    f"speculative decoding needs a scheduler that takes draft tokens "
                    f"(set_draft_tokens); {type(self.scheduler).__name__} does not: use the "
                    "fcfs scheduler family or drop speculative_config"
                )
            self.speculative = SpeculativeDecoder(settings, runtime=self.runtime)
        self._draft_probs: dict[str, Any] = {}  # request id -> draft distributions this step
        # a proposer that drafts from the target's features (Medusa/EAGLE-style heads)
        # gets each request's final-norm hidden state at its newest token
        self._wants_hidden = bool(
            self.speculative is not None
            and getattr(self.speculative.proposer, "needs_hidden_states", False)
        )
        if self._wants_hidden and not getattr(self.runtime, "execute_returns_rows", False):
            raise CapabilityMismatchError(
                f"speculative method {speculative_config!r} drafts from hidden states, which "
                f"runtime {type(self.runtime).__name__} does not return"
            )
        self._step_hidden: dict[str, Any] = {}  # request id -> this step's hidden rows
        self._drafted: dict[str, Any] = {}  # request id -> the drafts verified this step
        self._last_hidden: dict[str, Any] = {}  # request id -> hidden state at its newest token
        self.cot = CoTHooks(self)  # forced tokens, trial branches, self-consistency
        # prefill/decode disaggregation: the kv_transfer slot's channel (sagellm.engine.disagg)
        self.kv_transfer: KVTransferHooks | None = None
        if kv_transfer_config is not None:
            self.kv_transfer = KVTransferHooks(
                KVTransferSettings.parse(kv_transfer_config),
                kv_pool=self.kv_pool,
                scheduler=self.scheduler,
                prefix_index=parts.prefix_index,
            )

    @classmethod
    def from_config(
        cls, config: EngineConfig | None = None, options: BuildOptions | None = None, **kwargs: Any
    ) -> LLMEngine:
        """Build the components of ``config`` through the registry and wrap them."""
        speculative = options.speculative_config if options is not None else None
        kv_transfer = options.kv_transfer_config if options is not None else None
        parts = EngineBuilder(config or EngineConfig(), options, **kwargs).build()
        return cls(parts, speculative_config=speculative, kv_transfer_config=kv_transfer)

    def close(self) -> None:
        """Release what outlives the engine object: the KV transfer channel (a producer
        frees the blocks it still offers, a consumer drops its loads) and the runtime's
        processes (tensor-parallel workers)."""
        if self.kv_transfer is not None:
            self.kv_transfer.close()
        close = getattr(self.runtime, "close", None)
        if callable(close):  # a tensor-parallel runtime stops its workers
            close()

    def set_clock(self, clock: RealClock) -> None:
        """Read time from ``clock`` from now on (:class:`sagellm.engine.replay.ReplayClock`:
        virtual time); a scheduler with a ``clock`` attribute (the cost-aware policies)
        reads it too. Set it while no request is live: times already taken stay as read."""
        if self._requests:
            raise InvalidRequestError("set the clock while the engine holds no request")
        self.clock = clock
        if hasattr(self.scheduler, "clock"):
            self.scheduler.clock = clock.now

    # ------------------------------------------------------------------ requests

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` with the model's tokenizer."""
        if self.tokenizer is None:
            raise InvalidRequestError(
                "this engine was built without a tokenizer: pass token ids instead of text"
            )
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ids

    def validate(self, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> None:
        """Raise InvalidRequestError when a request could never be served."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty: give at least one token or character")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the context holds {self.max_model_len} "
                f"(prompt plus at least one generated token); shorten the prompt to at most "
                f"{self.max_model_len - 1} tokens"
            )
        bad = [t for t in prompt_token_ids if not (0 <= int(t) < self.vocab_size)]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}); "
                "use ids produced by this model's tokenizer"
            )
        if sampling.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop strings need a tokenizer; this engine has none: use stop_token_ids"
            )

    def add_request(
        self,
        request_id: str | None,
        prompt: Prompt,
        sampling: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        tenant: str = "",
        cache_salt: str = "",
        kind: RequestKind = RequestKind.COMPLETION,
        add_special_tokens: bool = True,
        slo: SLO | None = None,
        cot: CoTOptions | None = None,
        pooling: PoolingParams | None = None,
        prompt_logprobs: int | None = None,
        kv_transfer_params: Mapping[str, Any] | None = None,
    ) -> str:
        """Queue a request (text or token ids); returns its id.

        ``pooling`` makes it an embedding request: its final output carries ``embedding``
        and no completions (``sampling`` is ignored). ``prompt_logprobs=k`` returns the
        logprob of every prompt token with the ``k`` most likely ones at each position,
        from the output of the first token on. Neither kind reads or fills the prefix
        cache (``cache_salt`` does not matter to them).

        ``cot`` asks for self-consistency or DEER's early exit (see :mod:`sagellm.engine.cot`);
        ``sampling.thinking_token_budget`` caps the reasoning between the engine's markers.

        ``slo`` (TTFT/TPOT objectives) reaches the scheduler with the request; SLO-aware
        policies (``slo``, ``adaptive``) order and size their steps by it.

        ``kv_transfer_params`` (an engine built with ``kv_transfer_config``, vLLM's
        spelling): ``{"do_remote_decode": true}`` on a kv_producer keeps the prompt's KV
        when the request ends and puts the offer in its final output's
        ``kv_transfer_params``; that offer on a kv_consumer loads the prompt's KV from the
        producer instead of computing it (see :mod:`sagellm.engine.disagg`). An engine
        without ``kv_transfer_config`` ignores them with a warning, as vLLM does.

        Raises InvalidRequestError for an empty prompt, one that leaves no room in the
        context, token ids outside the vocabulary or an id already in use.
        """
        rows = pooling is not None or prompt_logprobs is not None
        if rows:
            self._check_rows_request(pooling, prompt_logprobs, cot)
            # Every prompt row is computed: the scheduler keeps the request out of the
            # prefix index (skip_prefix_cache), and a salt of its own keeps even a
            # scheduler that ignores that flag from matching it against a cached prefix.
            cache_salt = f"{cache_salt}\x00rows:{request_id}:{next(self._auto_ids)}"
        if pooling is not None:
            sampling = SamplingParams(max_tokens=1)
        sampling = self.cot.prepare(sampling or SamplingParams(), cot)
        constraint = structured_output_of(sampling)
        if constraint is not None:
            if sampling.thinking_token_budget is not None or (
                cot is not None and cot.early_exit is not None
            ):
                raise InvalidRequestError(
                    "a structured output cannot be combined with thinking_token_budget or "
                    "early exit (forced tokens would break the grammar): drop one of them"
                )
            self.structured.compile(constraint)  # a bad schema fails here, before queueing
        if request_id is None:
            request_id = f"req-{next(self._auto_ids)}"
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = self.tokenize(prompt, add_special_tokens=add_special_tokens)
        else:
            text = None
            try:
                token_ids = [int(t) for t in prompt]
            except (TypeError, ValueError) as exc:
                raise InvalidRequestError(
                    "a prompt is either a string or a sequence of integer token ids"
                ) from exc
        self.validate(token_ids, sampling)
        remote = None
        if kv_transfer_params and self.kv_transfer is None:
            # as vLLM does: a standalone instance serves the request as it would any other
            logger.warning(
                "request %s has kv_transfer_params but this engine has no kv_transfer_config: "
                "ignored (start it with --kv-transfer-config to take part in disaggregation)",
                request_id,
            )
            kv_transfer_params = None
        if kv_transfer_params:
            assert self.kv_transfer is not None
            if rows:
                raise InvalidRequestError(
                    "kv_transfer_params do not apply to embeddings or prompt_logprobs requests"
                )
            self.kv_transfer.check_params(kv_transfer_params, sampling.n)
            remote = self.kv_transfer.remote_offer(kv_transfer_params, token_ids)
        arrival = self.clock.now() if arrival_time is None else arrival_time
        req = _Request(request_id, text, token_ids, sampling, arrival)
        req.pooling = pooling
        req.num_prompt_logprobs = prompt_logprobs
        req.kv_offer = bool(kv_transfer_params and kv_transfer_params.get("do_remote_decode"))
        base_seed = sampling.seed if sampling.seed is not None else self._seed_rng.getrandbits(63)
        child_sampling = sampling.model_copy(update={"n": 1}) if sampling.n != 1 else sampling
        for i in range(sampling.n):
            sub_id = request_id if sampling.n == 1 else f"{request_id}#{i}"
            if sub_id in self._sequences:
                raise InvalidRequestError(f"request id {sub_id!r} is already in use")
            seed = base_seed if sampling.n == 1 else mix_seed(base_seed, i)
            detok = None
            if self.tokenizer is not None and pooling is None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, token_ids, skip_special_tokens=sampling.skip_special_tokens
                )
            seq = _Sequence(
                request_id=sub_id,
                parent=req,
                index=i,
                seed=seed,
                sampling=child_sampling,
                detokenizer=detok,
                stop_matcher=StopStringMatcher(sampling.stop),
                logprobs=[] if sampling.logprobs is not None else None,
                cumulative_logprob=0.0 if sampling.logprobs is not None else None,
                metrics=RequestMetrics(arrival_time=arrival, num_prompt_tokens=len(token_ids)),
                grammar=None if constraint is None else self.structured.new_state(constraint),
            )
            req.sequences.append(seq)
        added: list[str] = []
        try:
            self.cot.register(req, cot)
            for seq in req.sequences:
                gen = GenerationRequest(
                    request_id=seq.request_id,
                    prompt_token_ids=tuple(token_ids),
                    sampling=seq.sampling,
                    arrival_time=arrival,
                    priority=priority,
                    tenant=tenant,
                    cache_salt=cache_salt,
                    skip_prefix_cache=rows,
                    kind=kind,
                    eos_token_ids=self.eos_token_ids,
                    slo=slo if slo is not None else SLO(),
                )
                if self.cot.defer(seq, gen):  # a later self-consistency window
                    continue
                if remote is not None:
                    assert self.kv_transfer is not None
                    self.kv_transfer.start(gen, *remote)  # queued once its KV is here
                else:
                    self.scheduler.add_request(gen)
                added.append(seq.request_id)
                self._sequences[seq.request_id] = seq
                self.cot.start(seq)
        except Exception:
            for sub_id in added:
                self._sequences.pop(sub_id, None)
            self.scheduler.finish_requests(added, FinishReason.ABORT)
            self.cot.drop(request_id)
            raise
        self._requests[request_id] = req
        self._stats.num_requests_added += 1
        self._stats.num_prompt_tokens += len(token_ids) * sampling.n
        return request_id

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Stop requests and free their blocks; unknown ids are ignored.

        Returns the final (aborted) output of every request that was live.
        """
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outputs = []
        now = self.clock.now()
        for rid in request_ids:
            req = self._requests.pop(rid, None)
            if req is None:
                continue
            live = [s for s in req.sequences if not s.finished]
            if self.kv_transfer is not None:
                for seq in live:
                    self.kv_transfer.abort(seq.request_id)
            self.scheduler.finish_requests([s.request_id for s in live], FinishReason.ABORT)
            for seq in live:
                seq.finish_reason = FinishReason.ABORT
                seq.metrics.finished_time = now
                if self.speculative is not None:
                    self.speculative.observe_finished(
                        seq.request_id, req.prompt_token_ids, seq.output_token_ids
                    )
            for seq in req.sequences:
                self._sequences.pop(seq.request_id, None)
            self.cot.aborted(req)
            self._stats.num_requests_aborted += 1
            outputs.append(req.output())
        return outputs

    def has_unfinished_requests(self) -> bool:
        """True while a request is waiting or running."""
        return bool(self._requests)

    def live_request_ids(self) -> list[str]:
        """Ids of the caller requests not yet finished."""
        return list(self._requests)

    def has_background_work(self) -> bool:
        """True while something outside the requests needs :meth:`poll_background`: KV
        offers a kv_producer holds for their consumers (freed on acknowledgement or when
        their lease runs out), loads still in flight."""
        return self.kv_transfer is not None and self.kv_transfer.busy

    def poll_background(self) -> None:
        """Release what the KV transfer channel is done with (also done by every step)."""
        if self.kv_transfer is not None:
            self.kv_transfer.poll()

    def get_num_unfinished_requests(self) -> int:
        """Caller requests not yet finished."""
        return len(self._requests)

    # ------------------------------------------------------------------ the loop

    def step(self, *, unfinished_outputs: bool = True) -> list[RequestOutput]:
        """Run one scheduler step; outputs of every request that advanced or finished.

        ``unfinished_outputs=False`` returns only the requests that finished (batch callers
        skip building outputs they would discard).
        """
        t0 = self.clock.start_step()
        if self.kv_transfer is not None:
            self.kv_transfer.poll()  # queue requests whose KV arrived; free released offers
            if self.kv_transfer.num_loading and not self.scheduler.has_unfinished_requests():
                time.sleep(0.0005)  # only loads in flight: leave the cores to them
        if self.speculative is not None:
            self._propose(self.speculative)
        out = self.scheduler.schedule()
        self.last_step_num_tokens = out.num_scheduled_tokens
        now = self.clock.now()
        touched: dict[str, _Request] = {}
        finished: dict[FinishReason, list[str]] = {}

        for rid in out.preempted_request_ids:
            seq = self._sequences.get(rid)
            if seq is not None:
                seq.metrics.num_preemptions += 1
        for rid in out.rejected_request_ids:
            seq = self._sequences.get(rid)
            if seq is not None and not seq.finished:
                self._finish(seq, FinishReason.REJECTED, None, now)
                touched[seq.parent.request_id] = seq.parent
        self._stats.num_preemptions += len(out.preempted_request_ids)

        if out.chunks:
            for chunk in out.chunks:
                seq = self._sequences.get(chunk.request_id)
                if seq is not None and seq.metrics.first_scheduled_time is None:
                    seq.metrics.first_scheduled_time = now
                    seq.metrics.num_cached_tokens = chunk.num_computed_tokens
                if chunk.num_draft_tokens and self.speculative is None:
                    raise CapabilityMismatchError(
                        "the scheduler planned speculative tokens but this engine has no "
                        "proposer to verify them; pass speculative_config to the engine"
                    )
            plan = self.scheduler.build_plan(out)
            self._run_kv_moves(plan)
            hidden_ids, prompt_logit_ids = self._row_requests(out)
            if hidden_ids or prompt_logit_ids:
                # the native runtime's extension of Runtime.execute (checked when added)
                execute_rows: Any = self.runtime.execute
                model_out = execute_rows(
                    plan, hidden_ids=hidden_ids, prompt_logit_ids=prompt_logit_ids
                )
            else:
                model_out = self.runtime.execute(plan)
            row_ids = list(model_out.request_ids)
            logits = model_out.logits
            if hidden_ids or prompt_logit_ids:
                row_ids, logits = self._take_rows(out, model_out, now, touched)
            logits = self.cot.forced_logits(row_ids, logits)
            emitted = self._select_tokens(out, row_ids, logits)
            if self._step_hidden:
                self._keep_hidden(emitted)
            self.clock.advance(out)  # a replay clock moves by the step's predicted cost
            self.scheduler.update_from_output(out, {rid: e[0] for rid, e in emitted.items()})
            if self._observe_step is not None:  # cost-model policies (slo, adaptive) learn here
                self._observe_step(out.num_scheduled_tokens, self.clock.step_seconds(t0))
            now = self.clock.now()
            num_generated = 0
            for rid, (toks, lps, tops) in emitted.items():
                seq = self._sequences[rid]
                # verified drafts arrive several per step; a stop drops the ones after it
                for tok, lp, top in zip(toks, lps, tops):
                    stop = self._append_token(seq, tok, lp, top)
                    stop = self.cot.after_token(seq, stop)
                    num_generated += 1
                    if seq.metrics.first_token_time is None:
                        seq.metrics.first_token_time = now
                    if seq.index >= 0:  # a trial branch (index -1) has no caller
                        touched[seq.parent.request_id] = seq.parent
                    if stop is not None:
                        finished.setdefault(stop[0], []).append(rid)
                        self._finish(seq, stop[0], stop[1], now)
                        break
            self._stats.num_generation_tokens += num_generated
            self._stats.num_scheduled_tokens += out.num_scheduled_tokens

        for reason, ids in finished.items():
            if self.kv_transfer is not None and reason in (FinishReason.STOP, FinishReason.LENGTH):
                self._offer_kv(ids)
            self.scheduler.finish_requests(ids, reason)

        outputs = []
        for req in touched.values():
            done = req.finished
            if done or unfinished_outputs:
                outputs.append(req.output())
            if done:
                self._retire(req)
        self._stats.num_steps += 1
        self._stats.step_seconds += self.clock.step_seconds(t0)
        return outputs

    # ------------------------------------------------------------------ embeddings, prompt rows

    def _check_rows_request(
        self, pooling: PoolingParams | None, prompt_logprobs: int | None, cot: CoTOptions | None
    ) -> None:
        if pooling is not None and prompt_logprobs is not None:
            raise InvalidRequestError("an embedding request has no prompt_logprobs")
        if prompt_logprobs is not None and prompt_logprobs < 0:
            raise InvalidRequestError(f"prompt_logprobs must be 0 or more; got {prompt_logprobs}")
        if cot is not None:
            raise InvalidRequestError(
                "self-consistency and early exit cannot be combined with embeddings or "
                "prompt_logprobs"
            )
        if not getattr(self.runtime, "execute_returns_rows", False):
            raise CapabilityMismatchError(
                f"embeddings and prompt_logprobs need a runtime that returns every row of a "
                f"chunk; {type(self.runtime).__name__} does not: use the native runtime"
            )

    def _row_requests(self, out: Any) -> tuple[list[str], list[str]]:
        """Requests of this step whose chunks need hidden states / every row's logits."""
        hidden: list[str] = []
        prompt: list[str] = []
        for chunk in out.chunks:
            seq = self._sequences.get(chunk.request_id)
            if seq is None:
                continue
            req = seq.parent
            num_prompt = len(req.prompt_token_ids)
            if req.pooling is not None:
                # last pooling needs only the chunk that reaches the end of the prompt
                if req.pooling.pooling == "mean" or chunk.sample:
                    hidden.append(chunk.request_id)
                continue
            if self._wants_hidden and chunk.sample:
                hidden.append(chunk.request_id)
            if (
                req.num_prompt_logprobs is not None
                and seq.index == 0
                and chunk.num_computed_tokens < num_prompt - 1
                and not req.prompt_logprobs_done  # a recomputation after preemption
            ):
                prompt.append(chunk.request_id)
        return hidden, prompt

    def _take_rows(
        self, out: Any, model_out: Any, now: float, touched: dict[str, _Request]
    ) -> tuple[list[str], Any]:
        """Pool the hidden states and record the prompt logprobs of this step's rows;
        embedding requests whose prompt is complete finish here (their sampled row is
        dropped and their blocks go back to the pool). The sampled rows that remain, with
        their logits."""
        done: list[str] = []
        for chunk in out.chunks:
            rid = chunk.request_id
            seq = self._sequences.get(rid)
            if seq is None:
                continue
            req = seq.parent
            states = model_out.hidden.get(rid)
            if states is not None and req.pooling is None and self._wants_hidden:
                self._step_hidden[rid] = states
            if states is not None and req.pooling is not None:
                if req.pooling.pooling == "mean":
                    # a recomputation after preemption starts the sum again
                    first = chunk.num_computed_tokens == 0
                    total = states.sum(0, dtype=torch.float64)
                    seq.pooled = total if first or seq.pooled is None else seq.pooled + total
                else:
                    seq.pooled = states[-1]
                if chunk.sample:
                    req.embedding = self._pool_vector(seq.pooled, req)
                    self._finish(seq, FinishReason.STOP, None, now)
                    touched[req.request_id] = req
                    done.append(rid)
            rows = model_out.prompt_logits.get(rid)
            if rows is not None and req.num_prompt_logprobs is not None:
                self._record_prompt_logprobs(req, chunk.num_computed_tokens, rows)
        if done:
            self.scheduler.finish_requests(done, FinishReason.STOP)
        row_ids = list(model_out.request_ids)
        keep = [i for i, rid in enumerate(row_ids) if rid not in done]
        logits = model_out.logits
        if len(keep) != len(row_ids):
            logits = logits[keep]
            row_ids = [row_ids[i] for i in keep]
        return row_ids, logits

    @staticmethod
    def _pool_vector(pooled: Any, req: _Request) -> list[float]:
        assert req.pooling is not None
        vec = pooled.double()
        if req.pooling.pooling == "mean":
            vec = vec / len(req.prompt_token_ids)
        if req.pooling.normalize:
            vec = vec / vec.norm().clamp_min(1e-12)
        return [float(v) for v in vec.float()]

    @staticmethod
    def _record_prompt_logprobs(req: _Request, start: int, logits: Any) -> None:
        """Logprobs of the prompt tokens that the rows from position ``start`` predict."""
        k = req.num_prompt_logprobs
        assert k is not None
        prompt = req.prompt_token_ids
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for i in range(logprobs.shape[0]):
            target = start + i + 1  # row at position p predicts token p + 1
            if target >= len(prompt):
                break
            row = logprobs[i]
            tok = prompt[target]
            lp = row[tok]
            entry = {tok: PromptLogprob(float(lp), 1 + int((row > lp).sum()))}
            if k:
                values, ids = torch.topk(row, k)
                for rank, (t, v) in enumerate(zip(ids.tolist(), values.tolist()), 1):
                    entry.setdefault(int(t), PromptLogprob(float(v), rank))
            req.prompt_logprobs[target] = entry

    # ------------------------------------------------------------------ speculation

    def _keep_hidden(self, emitted: dict[str, _Emitted]) -> None:
        """Keep each request's hidden state at its newest token: of the chunk's rows, the
        one that predicted the last emitted token (the last row, or after verification
        the row of the last accepted draft)."""
        for rid, states in self._step_hidden.items():
            toks = emitted.get(rid)
            if toks is None:
                continue
            verified = 1 + len(self._drafted.get(rid, ()))
            self._last_hidden[rid] = states[states.shape[0] - verified + len(toks[0]) - 1]
        self._step_hidden.clear()

    def _propose(self, spec: SpeculativeDecoder) -> None:
        """Draft tokens for the decoding requests and hand them to the scheduler."""
        self._draft_probs.clear()
        if not spec.active(self.scheduler.num_running):
            return
        get_state = getattr(self.scheduler, "get_request", None)
        k = spec.settings.num_speculative_tokens
        requests = []
        for rid, seq in self._sequences.items():
            out_ids = seq.output_token_ids
            if not out_ids or seq.finished or self.cot.controls(rid):
                continue  # a CoT controller sees (and may force) one token per step
            if seq.grammar is not None:
                continue  # drafts are not checked against the grammar: constrained rows decode
            if get_state is not None:
                state = get_state(rid)
                # only a request whose KV covers everything but its newest token decodes
                if state is None or state.num_computed_tokens != len(state.token_ids) - 1:
                    continue
            room = self.max_model_len - len(seq.parent.prompt_token_ids) - len(out_ids) - 1
            max_tokens = seq.sampling.max_tokens
            if max_tokens is not None:
                room = min(room, max_tokens - len(out_ids) - 1)
            num = min(k, room)
            if num > 0:
                hidden = self._last_hidden.get(rid) if self._wants_hidden else None
                if self._wants_hidden and hidden is None:
                    continue  # no hidden state yet (the row that sampled it was not asked)
                requests.append(
                    DraftRequest(rid, seq.parent.prompt_token_ids, out_ids, num, hidden)
                )
        if not requests:
            return
        drafts = spec.propose(requests)
        self.scheduler.set_draft_tokens(  # type: ignore[attr-defined]
            {d.request_id: d.token_ids for d in drafts if d.token_ids}
        )
        for d in drafts:
            if d.token_ids and d.draft_probs is not None:
                self._draft_probs[d.request_id] = d.draft_probs

    def _sampling_row(self, seq: _Sequence, extra: Sequence[int] = ()) -> SamplingRow:
        outs = seq.output_token_ids
        return SamplingRow(
            params=seq.sampling,
            seed=seq.seed,
            prompt_token_ids=seq.parent.prompt_token_ids,
            output_token_ids=[*outs, *extra] if extra else outs,
            grammar=seq.grammar,
        )

    def _select_tokens(self, out: Any, row_ids: Sequence[str], logits: Any) -> dict[str, _Emitted]:
        """Tokens (with logprobs) of every sampled chunk, in row order: one sampled token,
        or what verifying the chunk's drafts emitted."""
        drafted = {c.request_id: c.token_ids[1:] for c in out.chunks if c.num_draft_tokens}
        self._drafted = drafted
        plain_rows: list[int] = []
        spans: list[tuple[str, int, int]] = []
        i = 0
        while i < len(row_ids):
            m = 1 + len(drafted.get(row_ids[i], ()))
            if m == 1:
                plain_rows.append(i)
            else:
                spans.append((row_ids[i], i, m))
            i += m
        result: dict[str, _Emitted] = {}
        if plain_rows:
            plain_ids = [row_ids[r] for r in plain_rows]
            rows = [self._sampling_row(self._sequences[rid]) for rid in plain_ids]
            sampled = self.sampler(logits if not spans else logits[plain_rows], rows)
            for rid, tok, lp, top in zip(
                plain_ids, sampled.token_ids, sampled.sampled_logprobs, sampled.top_logprobs
            ):
                result[rid] = ([tok], [lp], [top])
        for rid, start, m in spans:
            spec = self.speculative
            assert spec is not None
            seq = self._sequences[rid]
            block = logits[start : start + m]
            drafts = [int(t) for t in drafted[rid]]
            row = self._sampling_row(seq)
            toks = spec.verify(self.sampler, block, row, drafts, self._draft_probs.get(rid))
            if seq.sampling.logprobs is None:
                result[rid] = (toks, [None] * len(toks), [None] * len(toks))
                continue
            pos_rows = [self._sampling_row(seq, toks[:j]) for j in range(len(toks))]
            lp_out = self.sampler.logprobs(block[: len(toks)], toks, pos_rows)
            result[rid] = (toks, lp_out.sampled_logprobs, lp_out.top_logprobs)
        return {rid: result[rid] for rid in dict.fromkeys(row_ids)}

    # ------------------------------------------------------------------ stats

    def make_stats(self) -> EngineStats:
        """The engine's own stats since the previous call (counters reset)."""
        stats = self._stats
        self._stats = EngineStats()
        stats.num_running_requests = len(self._requests)
        return stats

    def component_stats(self) -> dict[str, object]:
        """``make_stats()`` of the engine and of every component that has one."""
        out: dict[str, object] = {"engine": self.make_stats()}
        for name, comp in self.parts.components().items():
            make = getattr(comp, "make_stats", None)
            if callable(make):
                out[name] = make()
        if self.speculative is not None:
            out["speculative"] = self.speculative.make_stats()
        if self.kv_transfer is not None:
            out["kv_transfer"] = self.kv_transfer.make_stats()
            out["kv_channel"] = self.kv_transfer.channel.make_stats()
        return out

    # ------------------------------------------------------------------ helpers

    def _append_token(
        self,
        seq: _Sequence,
        token_id: int,
        logprob: float | None,
        top: dict[int, float] | None,
    ) -> tuple[FinishReason, str | int | None] | None:
        """Record a sampled token; the finish reason and stop reason if it ends the sequence."""
        p = seq.sampling
        seq.output_token_ids.append(token_id)
        if seq.logprobs is not None and top is not None:
            seq.logprobs.append(top)
            seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + (logprob or 0.0)
        grammar_done = False
        if seq.grammar is not None:
            if not seq.grammar.accept(token_id):
                # The mask only lets allowed tokens through; nothing else samples this row.
                logger.error(
                    "request %s: token %d is not allowed by its grammar", seq.request_id, token_id
                )
                if seq.detokenizer is not None:
                    seq.text += seq.detokenizer.flush()
                return FinishReason.ABORT, "grammar"
            # A completed grammar ends on one of the engine's end-of-sequence ids, which
            # then ends the sequence even under ignore_eos.
            grammar_done = seq.grammar.terminated
        stop_token = ((grammar_done or not p.ignore_eos) and token_id in self.eos_token_ids) or (
            token_id in p.stop_token_ids
        )
        if stop_token:
            # The stop token itself is part of token_ids but not of the text.
            if seq.detokenizer is not None:
                seq.text += seq.detokenizer.flush()
            stop_reason = token_id if token_id in p.stop_token_ids else None
            return FinishReason.STOP, stop_reason
        if seq.detokenizer is not None:
            delta = seq.detokenizer.add(token_id)
            if delta:
                seq.text += delta
                match = seq.stop_matcher.find(seq.text, len(delta))
                if match is not None:
                    pos, stop = match
                    seq.text = (
                        seq.text[: pos + len(stop)]
                        if p.include_stop_str_in_output
                        else (seq.text[:pos])
                    )
                    return FinishReason.STOP, stop
        if grammar_done:
            if seq.detokenizer is not None:
                seq.text += seq.detokenizer.flush()
            return FinishReason.STOP, None
        num_output = len(seq.output_token_ids)
        if (p.max_tokens is not None and num_output >= p.max_tokens) or (
            len(seq.parent.prompt_token_ids) + num_output >= self.max_model_len
        ):
            if seq.detokenizer is not None:
                seq.text += seq.detokenizer.flush()
            return FinishReason.LENGTH, None
        return None

    def _run_kv_moves(self, plan: ExecutionPlan) -> None:
        """Execute the plan's KV_MIGRATE nodes (the runtime runs compute nodes only)."""
        if plan.graph.of_kind(IRNodeKind.KV_TRANSFER):
            raise CapabilityMismatchError(
                "the plan sends KV blocks to another instance, which a single-instance "
                "engine cannot do; use a scheduler without disaggregation"
            )
        for node in plan.graph.of_kind(IRNodeKind.KV_MIGRATE):
            if not isinstance(self.kv_pool, KVMigrator):
                raise CapabilityMismatchError(
                    f"the plan migrates KV blocks between tiers but the KV pool "
                    f"{type(self.kv_pool).__name__} cannot migrate; use a tiered pool"
                )
            for migration in node.migrations:
                self.kv_pool.migrate(migration)

    def _finish(
        self, seq: _Sequence, reason: FinishReason, stop_reason: str | int | None, now: float
    ) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.metrics.finished_time = now
        seq.metrics.num_output_tokens = len(seq.output_token_ids)
        self._sequences.pop(seq.request_id, None)
        self._last_hidden.pop(seq.request_id, None)
        if self.speculative is not None:
            self.speculative.observe_finished(
                seq.request_id, seq.parent.prompt_token_ids, seq.output_token_ids
            )
        self.cot.finished(seq)

    def _offer_kv(self, request_ids: Sequence[str]) -> None:
        """kv_producer: keep the prompt KV of finished requests that asked for it."""
        assert self.kv_transfer is not None
        for rid in request_ids:
            req = self._requests.get(rid)
            if req is not None and req.kv_offer:
                req.kv_transfer_params = self.kv_transfer.offer(rid, req.prompt_token_ids)

    def _retire(self, req: _Request) -> None:
        self._requests.pop(req.request_id, None)
        self._stats.num_requests_finished += 1
        out_metrics = req.output().metrics
        if out_metrics.ttft is not None:
            self._stats.ttft_seconds.append(out_metrics.ttft)
        for seq in req.sequences:
            tpot = seq.metrics.tpot
            if tpot is not None and len(seq.output_token_ids) > 1:
                self._stats.tpot_seconds.append(tpot)
            if seq.metrics.finished_time is not None:
                self._stats.e2e_seconds.append(seq.metrics.finished_time - req.arrival_time)

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        model_config = getattr(self.runtime, "model_config", None)
        ids.extend(getattr(model_config, "eos_token_ids", ()) or ())
        tok = self.tokenizer
        if tok is not None and getattr(tok, "eos_token_id", None) is not None:
            ids.append(int(tok.eos_token_id))
        return tuple(dict.fromkeys(int(i) for i in ids))

    def _vocab_size(self) -> int:
        model_config = getattr(self.runtime, "model_config", None)
        size = getattr(model_config, "vocab_size", None)
        if size is None and self.tokenizer is not None:
            size = len(self.tokenizer)
        return int(size) if size is not None else 1 << 31
