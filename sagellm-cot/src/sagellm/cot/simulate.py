"""A reference generation loop with the engine's controller rules, and scripted models.

:func:`generate` applies :class:`~sagellm.core.protocols.CoTController` steps exactly as
the engine does (forced tokens are emitted one per step in place of the sampled token, the
controllers are not consulted while forced tokens are pending, ``stop`` takes effect once
they are out), except that a trial branch resolves at once instead of a few steps later.
:func:`self_consistency` draws samples in windows and asks a rule after each one.
:class:`ScriptedReasoner` is a model whose reasoning, answer and trial answers are known,
so every stopping rule can be checked token by token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sagellm.core.protocols import CoTController
from sagellm.core.types import CoTStep, CoTVote
from sagellm.cot._tokens import ends_with

__all__ = ["ScriptedReasoner", "Trace", "generate", "self_consistency"]


class Model(Protocol):
    """What :func:`generate` needs of a model."""

    def next_token(self, prompt: Sequence[int], output: Sequence[int]) -> tuple[int, float]:
        """The next token after ``prompt + output`` and its log-probability."""
        ...

    def trial(
        self, prompt: Sequence[int], output: Sequence[int], probe: Sequence[int], max_tokens: int
    ) -> tuple[list[int], list[float]]:
        """A greedy continuation of ``prompt + output + probe`` and its logprobs."""
        ...


@dataclass
class Trace:
    """What one generation did."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (end of sequence), "length" or "controller"
    num_sampled: int = 0  # tokens the model picked
    num_forced: int = 0  # tokens controllers forced
    probes: list[int] = field(default_factory=list)  # output length at each trial branch
    reasons: list[str] = field(default_factory=list)  # reason of each controller step


def generate(
    model: Model,
    controllers: Sequence[CoTController],
    prompt: Sequence[int],
    *,
    max_tokens: int,
    eos_token_ids: Sequence[int] = (),
    request_id: str = "r",
) -> Trace:
    """Generate under ``controllers`` (the first that answers a hook wins that hook)."""
    trace = Trace()
    out = trace.token_ids
    pending: list[int] = []
    stop_after = False

    def apply(step: CoTStep | None, ctl: CoTController) -> bool:
        nonlocal stop_after
        while step is not None:
            trace.reasons.append(step.reason)
            if step.forced_token_ids or step.stop:
                pending[:] = step.forced_token_ids
                stop_after = step.stop
                return True
            if not step.probe_token_ids:
                return True
            trace.probes.append(len(out))
            toks, lps = model.trial(prompt, out, step.probe_token_ids, step.probe_max_tokens)
            step = ctl.observe_probe(request_id, toks, lps)
        return False

    try:
        for ctl in controllers:
            if apply(ctl.start(request_id, prompt), ctl):
                break
        while True:
            if not pending and stop_after:
                trace.finish_reason = "controller"
                return trace
            if pending:
                tok = pending.pop(0)
                trace.num_forced += 1
            else:
                tok, _ = model.next_token(prompt, out)
                trace.num_sampled += 1
            out.append(tok)
            if tok in eos_token_ids:
                trace.finish_reason = "stop"
                return trace
            if len(out) >= max_tokens:
                trace.finish_reason = "length"
                return trace
            if pending:
                continue
            for ctl in controllers:
                if apply(ctl.step(request_id, out), ctl):
                    break
    finally:
        for ctl in controllers:
            ctl.finish(request_id)


def self_consistency(
    rule: CoTController,
    sample: Callable[[int], str | None],
    num_planned: int,
    window: int,
) -> tuple[CoTVote, list[str | None]]:
    """Draw ``sample(i)`` window by window until ``rule.vote`` stops; the vote and answers."""
    if window < 1:
        raise ValueError(f"window is {window}: draw at least one sample per window")
    answers: list[str | None] = []
    while True:
        base = len(answers)
        take = min(window, num_planned - base)
        answers.extend([sample(base + i) for i in range(take)])
        decision = rule.vote(answers, num_planned)
        if decision.stop:
            return decision, answers
        assert len(answers) < num_planned, "a rule must stop once every planned sample is in"


class ScriptedReasoner:
    """A model that reasons, closes its reasoning and answers, all as scripted.

    Its output is ``reasoning + end_token_ids + answer + [eos]``. Once the output holds the
    end marker (written by itself or forced), it writes ``answer`` and then ``eos`` from
    there. A trial branch taken after ``k`` output tokens returns ``trials[k]`` (tokens and
    logprobs), or ``default_trial``. Every sampled token has log-probability ``logprob``.
    """

    def __init__(
        self,
        reasoning: Sequence[int],
        answer: Sequence[int],
        end_token_ids: Sequence[int],
        eos_token_id: int,
        *,
        trials: Mapping[int, tuple[Sequence[int], Sequence[float]]] | None = None,
        default_trial: tuple[Sequence[int], Sequence[float]] = ((), ()),
        logprob: float = math.log(0.5),
    ) -> None:
        self.reasoning = list(reasoning)
        self.answer = list(answer)
        self.end = list(end_token_ids)
        self.eos = eos_token_id
        self.trials = dict(trials or {})
        self.default_trial = default_trial
        self.logprob = logprob
        self.num_trials = 0
        self._output: Sequence[int] | None = None
        self._scanned = 0
        self._closed: int | None = None

    def _closed_at(self, output: Sequence[int]) -> int | None:
        # incremental over one growing output; another (or a shorter) one starts afresh
        if output is not self._output or len(output) < self._scanned:
            self._output, self._scanned, self._closed = output, 0, None
        if self._closed is None:
            for end in range(max(self._scanned, len(self.end)), len(output) + 1):
                if ends_with(output, end, self.end):
                    self._closed = end
                    break
        self._scanned = len(output)
        return self._closed

    def next_token(self, prompt: Sequence[int], output: Sequence[int]) -> tuple[int, float]:
        """The scripted next token."""
        closed = self._closed_at(output)
        if closed is None:
            script = self.reasoning + self.end
            k = len(output)
            tok = script[k] if k < len(script) else self.eos
        else:
            k = len(output) - closed
            tok = self.answer[k] if k < len(self.answer) else self.eos
        return tok, self.logprob

    def trial(
        self, prompt: Sequence[int], output: Sequence[int], probe: Sequence[int], max_tokens: int
    ) -> tuple[list[int], list[float]]:
        """The scripted trial answer at this output length, cut at ``max_tokens``."""
        self.num_trials += 1
        toks, lps = self.trials.get(len(output), self.default_trial)
        return list(toks)[:max_tokens], list(lps)[:max_tokens]
