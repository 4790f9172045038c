"""Chain-of-thought control inside the engine's step loop.

The engine calls four hooks of :class:`CoTHooks`; the controllers themselves come from the
``sagellm.cot`` entry-point group (``thinking_budget``, ``deer``, ``esc``, ...).

* Forced tokens. A controller's :class:`~sagellm.core.types.CoTStep` may force tokens (the
  end-of-reasoning marker when a thinking budget is spent). Each of the next steps masks the
  request's logit row to the forced token before the sampler runs, so the token goes
  through the same path as a sampled one: the scheduler appends it (KV, blocks), stop
  strings and the detokenizer see it.
* Trial branches (DEER). A step may ask for a trial answer: a greedy side request whose
  prompt is the request's tokens so far plus the answer prompt; it runs next to the request
  (the prefix cache shares what it can) and its tokens and logprobs go back to the
  controller, which may then force the end marker.
* Self-consistency. A request with ``self_consistency`` draws ``n`` samples of one prompt
  in windows (the prompt's blocks are shared through the prefix cache); after each window
  the rule votes, and the samples not yet drawn are dropped once it stops. The vote is in
  :attr:`RequestOutput.consistency`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from sagellm.core import registry
from sagellm.core.errors import InvalidRequestError
from sagellm.core.protocols import CoTController
from sagellm.core.types import (
    CoTStep,
    CoTVote,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    SelfConsistency,
)

if TYPE_CHECKING:
    from sagellm.engine.llm_engine import LLMEngine, _Request, _Sequence

__all__ = [
    "CoTHooks",
    "CoTOptions",
    "EarlyExit",
    "ReasoningMarkers",
    "ReasoningStream",
    "split_reasoning",
]

_GROUP = "sagellm.cot"


class ReasoningMarkers(BaseModel):
    """The strings that open and close a model's reasoning (vLLM's reasoning config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: str = "<think>"  # opens the reasoning ("" : open from the first token)
    end: str = Field("</think>", min_length=1)  # closes it


class EarlyExit(BaseModel):
    """DEER's options with strings; the engine tokenizes them for the controller."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transitions: tuple[str, ...] = ("Wait", "Alternatively", "Hmm")  # where trials are tried
    answer_prompt: str = "\n</think>\n\nFinal answer: "  # appended for the trial branch
    threshold: float = Field(0.95, gt=0.0, le=1.0)  # confidence that ends the reasoning
    probe_max_tokens: int = Field(16, ge=1, le=256)  # trial-answer length
    confidence: str = "mean"  # "mean" or "min" token probability
    max_probes: int = Field(8, ge=1)  # trials per request
    min_reasoning_tokens: int = Field(0, ge=0)  # no trial before this many
    # token ids instead of the strings (for engines without a tokenizer, and exact tests)
    transition_token_ids: tuple[tuple[int, ...], ...] = ()
    answer_prompt_token_ids: tuple[int, ...] = ()


class CoTOptions(BaseModel):
    """Per-request chain-of-thought options (``thinking_token_budget`` is a sampling field)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    self_consistency: SelfConsistency | None = None  # sample, vote, stop early
    early_exit: EarlyExit | None = None  # DEER-style early exit of the reasoning


@dataclass
class _SeqState:
    controllers: list[CoTController]
    gen: GenerationRequest | None = None  # how the sample enters the scheduler
    pending: list[int] = field(default_factory=list)  # forced tokens still to emit
    stop_after: str | None = None  # finish with this reason once ``pending`` is out
    probe_id: str | None = None  # the running trial branch
    probe_owner: CoTController | None = None


@dataclass
class _Run:
    """Self-consistency state of one caller request."""

    rule: CoTController
    options: SelfConsistency
    held: list[tuple[_Sequence, GenerationRequest]]  # samples not yet drawn, in order
    drawn: list[_Sequence] = field(default_factory=list)
    vote: CoTVote | None = None


class CoTHooks:
    """The engine's chain-of-thought hooks (one per engine)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.markers = ReasoningMarkers()
        self._marker_ids: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._states: dict[str, _SeqState] = {}  # by scheduler id of a sample
        self._runs: dict[str, _Run] = {}  # by caller id
        self._probes: dict[str, _Sequence] = {}  # trial branch id -> the sample it serves
        self._probe_seqs: dict[str, _Sequence] = {}
        self._cancelled: set[str] = set()  # trial branches to end at their next token
        self._num_probes = 0  # trial branches started (names them)
        self.num_forced_tokens = 0  # tokens emitted by controllers (all requests)

    # ------------------------------------------------------------------ configuration

    def configure(
        self,
        markers: ReasoningMarkers | None = None,
        *,
        start_token_ids: Sequence[int] | None = None,
        end_token_ids: Sequence[int] | None = None,
    ) -> None:
        """Set the reasoning markers, as strings or (without a tokenizer) as token ids."""
        if markers is not None:
            self.markers = markers
            self._marker_ids = None
        if end_token_ids is not None:
            if not end_token_ids:
                raise InvalidRequestError("end_token_ids is empty: give the closing marker")
            self._marker_ids = (tuple(start_token_ids or ()), tuple(end_token_ids))

    def marker_ids(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(start, end) marker token ids."""
        if self._marker_ids is None:
            self._marker_ids = (self._encode(self.markers.start), self._encode(self.markers.end))
        return self._marker_ids

    def _encode(self, text: str) -> tuple[int, ...]:
        if not text:
            return ()
        if self.engine.tokenizer is None:
            raise InvalidRequestError(
                "reasoning markers are strings but this engine has no tokenizer; "
                "configure them as token ids (start_token_ids=..., end_token_ids=...)"
            )
        return tuple(self.engine.tokenize(text, add_special_tokens=False))

    # ------------------------------------------------------------------ admission

    def prepare(self, sampling: SamplingParams, options: CoTOptions | None) -> SamplingParams:
        """Validate a request's options; a self-consistent request samples ``n`` times."""
        sc = options.self_consistency if options is not None else None
        if sc is not None:
            if sampling.n != 1:
                raise InvalidRequestError(
                    f"n={sampling.n} and self_consistency both set the number of samples; "
                    "give the count as self_consistency.n only"
                )
            sampling = sampling.model_copy(update={"n": sc.n})
        if sampling.thinking_token_budget is not None or (
            options is not None and options.early_exit is not None
        ):
            self.marker_ids()  # fails early without a tokenizer
        return sampling

    def register(self, req: _Request, options: CoTOptions | None) -> None:
        """Called once the request's samples exist, before any enters the scheduler."""
        sc = options.self_consistency if options is not None else None
        if sc is not None:
            cls = registry.load_class(_GROUP, sc.method)
            opts = dict(sc.options)
            fields = getattr(getattr(cls, "config_class", None), "model_fields", {})
            if "window" in fields:
                opts.setdefault("window", sc.window)
            self._runs[req.request_id] = _Run(registry.load(_GROUP, sc.method, opts), sc, [])
        for seq in req.sequences:
            self._states[seq.request_id] = _SeqState(self._controllers(seq, options))

    def defer(self, seq: _Sequence, gen: GenerationRequest) -> bool:
        """True when the sample waits for a later window (it is not scheduled now)."""
        self._states[seq.request_id].gen = gen
        run = self._runs.get(seq.parent.request_id)
        if run is None:
            return False
        if seq.index < run.options.window:
            run.drawn.append(seq)
            return False
        run.held.append((seq, gen))
        return True

    def start(self, seq: _Sequence) -> None:
        """Called when a sample enters the scheduler."""
        st = self._states.get(seq.request_id)
        if st is None:
            return
        for ctl in st.controllers:
            if self._apply(seq, st, ctl, ctl.start(seq.request_id, seq.parent.prompt_token_ids)):
                break

    def drop(self, request_id: str) -> None:
        """Forget a caller request whose admission failed."""
        self._runs.pop(request_id, None)
        for sid in [s for s in self._states if s == request_id or s.startswith(request_id + "#")]:
            self._forget(sid)

    def _controllers(self, seq: _Sequence, options: CoTOptions | None) -> list[CoTController]:
        out: list[CoTController] = []
        budget = seq.sampling.thinking_token_budget
        if budget is None and (options is None or options.early_exit is None):
            return out
        start, end = self.marker_ids()
        if budget is not None:
            out.append(
                registry.load(
                    _GROUP,
                    "thinking_budget",
                    {"budget": budget, "start_token_ids": start, "end_token_ids": end},
                )
            )
        if options is not None and options.early_exit is not None:
            ee = options.early_exit
            transitions: list[tuple[int, ...]] = list(ee.transition_token_ids)
            for text in ee.transitions if not transitions else ():
                for variant in {text, " " + text.lstrip()}:
                    ids = self._encode(variant)
                    if ids and ids not in transitions:
                        transitions.append(ids)
            out.append(
                registry.load(
                    _GROUP,
                    "deer",
                    {
                        "start_token_ids": start,
                        "end_token_ids": end,
                        "transition_token_ids": transitions,
                        "answer_prompt_token_ids": ee.answer_prompt_token_ids
                        or self._encode(ee.answer_prompt),
                        "answer_stop_token_ids": self.engine.eos_token_ids,
                        "threshold": ee.threshold,
                        "probe_max_tokens": ee.probe_max_tokens,
                        "confidence": ee.confidence,
                        "max_probes": ee.max_probes,
                        "min_reasoning_tokens": ee.min_reasoning_tokens,
                    },
                )
            )
        return out

    # ------------------------------------------------------------------ the step

    def controls(self, request_id: str) -> bool:
        """True when token-level controllers watch the sample (it gets no draft tokens:
        a budget must be able to force its marker right after any token)."""
        st = self._states.get(request_id)
        return st is not None and bool(st.controllers)

    def forced_logits(self, row_ids: Sequence[str], logits: Any) -> Any:
        """``logits`` with the rows of requests that have a forced token masked to it."""
        rows = []
        seen: set[str] = set()
        for i, rid in enumerate(row_ids):
            st = self._states.get(rid)
            # only a request's first row: later rows verify draft tokens, which the
            # forced one then rejects
            if st is not None and st.pending and rid not in seen:
                rows.append((i, st.pending[0]))
            seen.add(rid)
        if not rows:
            return logits
        logits = logits.clone()
        for i, tok in rows:
            logits[i].fill_(-math.inf)
            logits[i, tok] = 0.0
        self.num_forced_tokens += len(rows)
        return logits

    def after_token(
        self, seq: _Sequence, stop: tuple[FinishReason, str | int | None] | None
    ) -> tuple[FinishReason, str | int | None] | None:
        """Called after a token was appended; the finish reason, possibly a controller's."""
        if seq.request_id in self._cancelled:
            self._cancelled.discard(seq.request_id)
            return FinishReason.ABORT, None
        owner = self._probes.get(seq.request_id)
        if owner is not None:
            if stop is not None:
                self._probe_done(seq, owner)
            return stop
        st = self._states.get(seq.request_id)
        if st is None or stop is not None:
            return stop
        if st.pending:
            assert seq.output_token_ids[-1] == st.pending[0], "a forced token was not emitted"
            st.pending.pop(0)
            if st.pending:
                return None
            if st.stop_after is not None:
                return FinishReason.STOP, st.stop_after
        for ctl in st.controllers:
            if self._apply(seq, st, ctl, ctl.step(seq.request_id, seq.output_token_ids)):
                break
        if st.stop_after is not None and not st.pending:
            return FinishReason.STOP, st.stop_after
        return None

    def _apply(
        self, seq: _Sequence, st: _SeqState, ctl: CoTController, step: CoTStep | None
    ) -> bool:
        if step is None:
            return False
        if step.forced_token_ids or step.stop:
            st.pending = list(step.forced_token_ids)
            st.stop_after = (step.reason or "cot") if step.stop else None
            return True
        if step.probe_token_ids and st.probe_id is None:
            self._start_probe(seq, st, ctl, step)
        return True

    # ------------------------------------------------------------------ trial branches

    def _start_probe(
        self, seq: _Sequence, st: _SeqState, ctl: CoTController, step: CoTStep
    ) -> None:
        from sagellm.engine.detokenizer import StopStringMatcher
        from sagellm.engine.llm_engine import _Sequence as Seq

        eng = self.engine
        prompt = [*seq.parent.prompt_token_ids, *seq.output_token_ids, *step.probe_token_ids]
        room = eng.max_model_len - len(prompt)
        if room < 1:  # no room for a trial: the controller hears of an empty one
            self._observe(seq, st, ctl, [], [])
            return
        self._num_probes += 1
        pid = f"{seq.request_id}~trial{self._num_probes}"
        sampling = SamplingParams(
            max_tokens=min(step.probe_max_tokens, room), temperature=0.0, logprobs=0
        )
        probe = Seq(
            request_id=pid,
            parent=seq.parent,
            index=-1,
            seed=0,
            sampling=sampling,
            detokenizer=None,
            stop_matcher=StopStringMatcher(()),
            logprobs=[],
            cumulative_logprob=0.0,
        )
        assert st.gen is not None, "a sample's request is known before it runs"
        gen = st.gen.model_copy(
            update={"request_id": pid, "prompt_token_ids": tuple(prompt), "sampling": sampling}
        )
        eng.scheduler.add_request(gen)
        eng._sequences[pid] = probe
        self._probes[pid] = seq
        self._probe_seqs[pid] = probe
        st.probe_id, st.probe_owner = pid, ctl

    def _probe_done(self, probe: _Sequence, owner: _Sequence) -> None:
        self._probes.pop(probe.request_id, None)
        self._probe_seqs.pop(probe.request_id, None)
        st = self._states.get(owner.request_id)
        if st is None or st.probe_id != probe.request_id or st.probe_owner is None:
            return
        ctl = st.probe_owner
        st.probe_id = st.probe_owner = None
        toks = list(probe.output_token_ids)
        lps = [float(entry.get(t, 0.0)) for t, entry in zip(toks, probe.logprobs or [])]
        if owner.finished:
            return
        self._observe(owner, st, ctl, toks, lps)

    def _observe(
        self, seq: _Sequence, st: _SeqState, ctl: CoTController, toks: list[int], lps: list[float]
    ) -> None:
        step = ctl.observe_probe(seq.request_id, toks, lps)
        if step is not None and not st.pending:
            self._apply(seq, st, ctl, step)

    def _cancel_probe(self, st: _SeqState, *, now: bool) -> None:
        """End a trial branch: at once (outside a step) or at its next token (inside one,
        where the step may still hold a row of it)."""
        pid = st.probe_id
        if pid is None:
            return
        st.probe_id = st.probe_owner = None
        self._probes.pop(pid, None)
        probe = self._probe_seqs.pop(pid, None)
        if not now:
            self._cancelled.add(pid)
            return
        self.engine.scheduler.finish_requests([pid], FinishReason.ABORT)
        self.engine._sequences.pop(pid, None)
        if probe is not None:
            probe.finish_reason = FinishReason.ABORT

    # ------------------------------------------------------------------ ends

    def finished(self, seq: _Sequence) -> None:
        """Called when a sample (or trial branch) finished; may draw the next window."""
        if seq.index < 0:
            self._probes.pop(seq.request_id, None)
            self._probe_seqs.pop(seq.request_id, None)
            return
        if seq.request_id in self._states:
            self._forget(seq.request_id, now=False)
        run = self._runs.get(seq.parent.request_id)
        if run is None or not all(s.finished for s in run.drawn):
            return
        answers = [
            run.rule.extract_answer(s.text) if s.finish_reason != FinishReason.ABORT else None
            for s in run.drawn
        ]
        vote = run.rule.vote(answers, run.options.n)
        run.vote = vote
        req = seq.parent
        req.consistency = vote
        if vote.stop or not run.held:
            for s, _ in run.held:
                self._forget(s.request_id, now=False)
            run.held.clear()
            req.sequences = list(run.drawn)
            self._runs.pop(req.request_id, None)
            return
        take, run.held = run.held[: run.options.window], run.held[run.options.window :]
        eng = self.engine
        for s, gen in take:
            run.drawn.append(s)
            eng.scheduler.add_request(gen)
            eng._sequences[s.request_id] = s
            self.start(s)

    def aborted(self, req: _Request) -> None:
        """Called when a caller request is aborted."""
        self._runs.pop(req.request_id, None)
        for seq in req.sequences:
            self._forget(seq.request_id, now=True)

    def _forget(self, sid: str, *, now: bool = True) -> None:
        st = self._states.pop(sid, None)
        if st is None:
            return
        self._cancel_probe(st, now=now)
        for ctl in st.controllers:
            ctl.finish(sid)

    def make_stats(self) -> dict[str, int]:
        """Forced tokens since the last call (reset) and trial branches ever started."""
        stats = {"num_forced_tokens": self.num_forced_tokens, "num_trials": self._num_probes}
        self.num_forced_tokens = 0
        return stats


def split_reasoning(text: str, markers: ReasoningMarkers) -> tuple[str | None, str]:
    """(reasoning, content) of a completion, as vLLM's reasoning parsers split them.

    The reasoning is what precedes the end marker, after the start marker when one is
    configured. A reasoning never closed (``max_tokens`` cut it) is all reasoning. With a
    start marker configured, text that does not open with it is all content.
    """
    reasoning, content, _ = _split(text, markers, final=True)
    return (None if reasoning is None else reasoning.strip()), content.lstrip()


def _split(text: str, markers: ReasoningMarkers, *, final: bool) -> tuple[str | None, str, int]:
    """Raw (reasoning, content, held) of ``text``; ``held`` characters at its end may still
    turn out to be a marker (only when not ``final``)."""
    start, end = markers.start, markers.end
    body = text
    if start:
        stripped = text.lstrip()
        if not stripped.startswith(start):
            if not final and start.startswith(stripped):
                return None, "", len(text)  # may still open with the start marker
            return None, text, 0
        body = stripped[len(start) :]
    pos = body.find(end)
    if pos >= 0:
        return body[:pos], body[pos + len(end) :], 0
    held = 0
    if not final:  # a tail that begins the end marker is held back
        for k in range(min(len(end) - 1, len(body)), 0, -1):
            if body.endswith(end[:k]):
                held = k
                break
    return body[: len(body) - held], "", held


class ReasoningStream:
    """Splits a streamed completion's text deltas into reasoning and content deltas.

    Usage::

        split = ReasoningStream(ReasoningMarkers())
        split.feed("<think>so 3 + 4")   # ("so 3 + 4", "")
        split.feed(" = 7</thi")         # (" = 7", "")   -- "</thi" held back
        split.feed("nk>7")              # ("", "7")
    """

    def __init__(self, markers: ReasoningMarkers) -> None:
        self.markers = markers
        self.text = ""
        self._reasoning = 0  # characters of reasoning already sent
        self._content = 0

    def feed(self, delta: str, *, final: bool = False) -> tuple[str, str]:
        """(reasoning delta, content delta) after ``delta``; ``final`` flushes what is held."""
        self.text += delta
        reasoning, content, _ = _split(self.text, self.markers, final=final)
        r = (reasoning or "")[self._reasoning :]
        c = content[self._content :]
        self._reasoning += len(r)
        self._content += len(c)
        return r, c


def options_from_mapping(data: Mapping[str, Any] | None) -> CoTOptions | None:
    """``CoTOptions`` from plain data (``None`` when empty)."""
    if not data:
        return None
    return CoTOptions.model_validate(data)
