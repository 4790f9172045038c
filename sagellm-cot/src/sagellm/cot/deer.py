"""DEER-style early exit of reasoning (Yang et al., arXiv 2504.15895).

At each transition phrase of the reasoning ("Wait", "Alternatively", ...) the controller
asks the engine for a trial answer: a greedy branch that continues the tokens so far plus
an answer prompt (the end marker and "Final answer:", say). The branch's confidence is the
mean probability of its tokens (DEER's measure; ``min`` takes the least likely one). When it
reaches the threshold the reasoning ends: the end marker is forced into the request, which
then writes its answer. Otherwise the request goes on reasoning as if nothing happened.

The engine runs the branch next to the request (it shares the prefix through the cache), so
the decision lands a few tokens after the transition phrase; the end marker is forced there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from sagellm.core.types import CoTStep, CoTVote
from sagellm.cot._tokens import ReasoningSpan, ends_with
from sagellm.cot.answers import AnswerExtractor
from sagellm.cot.config import DeerConfig
from sagellm.cot.vote import majority_vote

__all__ = ["DeerController", "trial_confidence"]


def trial_confidence(logprobs: Sequence[float], how: str = "mean") -> float:
    """Confidence of a trial answer from its tokens' log-probabilities (0 when empty)."""
    if not logprobs:
        return 0.0
    probs = [math.exp(lp) for lp in logprobs]
    if how == "mean":
        return sum(probs) / len(probs)
    if how == "min":
        return min(probs)
    raise ValueError(f"unknown confidence measure {how!r}; use 'mean' or 'min'")


@dataclass(slots=True)
class _State:
    span: ReasoningSpan
    num_probes: int = 0
    probing: bool = False  # a trial branch is running
    exited: bool = False  # the end marker was forced by an early exit


class DeerController:
    """Ends reasoning early when a trial answer at a transition phrase is confident.

    Usage::

        ctl = DeerController(DeerConfig(end_token_ids=(8,), transition_token_ids=((5,),),
                                        answer_prompt_token_ids=(8, 9), threshold=0.9))
        ctl.start("r1", prompt_ids)
        ctl.step("r1", [11, 12, 5])       # CoTStep(probe_token_ids=(8, 9), ...)
        ctl.observe_probe("r1", [42], [-0.01])   # CoTStep(forced_token_ids=(8,))
    """

    config_class: ClassVar[type[DeerConfig]] = DeerConfig

    def __init__(self, config: DeerConfig) -> None:
        self.config = config
        self._extract = AnswerExtractor(config.answer)
        self._states: dict[str, _State] = {}
        self.num_probes = 0  # trial branches asked for (since the last make_stats)
        self.num_exits = 0  # reasonings ended early
        self.confidences: list[float] = []  # every trial's confidence, in order

    def start(self, request_id: str, prompt_token_ids: Sequence[int]) -> CoTStep | None:
        """Begin tracking a request."""
        if request_id in self._states:
            raise ValueError(f"request {request_id!r} is already started; finish it first")
        cfg = self.config
        self._states[request_id] = _State(
            ReasoningSpan(cfg.start_token_ids, cfg.end_token_ids, prompt_token_ids)
        )
        return None

    def step(self, request_id: str, token_ids: Sequence[int]) -> CoTStep | None:
        """Ask for a trial answer when a new token completes a transition phrase."""
        st = self._states.get(request_id)
        if st is None:
            raise KeyError(f"request {request_id!r} was not started")
        before = st.span.scanned
        st.span.advance(token_ids)
        cfg = self.config
        if (
            not st.span.think_open
            or st.probing
            or st.num_probes >= cfg.max_probes
            or st.span.num_reasoning_tokens < cfg.min_reasoning_tokens
        ):
            return None
        for end in range(max(before, 0) + 1, len(token_ids) + 1):
            if any(ends_with(token_ids, end, t) for t in cfg.transition_token_ids):
                st.probing = True
                st.num_probes += 1
                self.num_probes += 1
                return CoTStep(
                    probe_token_ids=cfg.answer_prompt_token_ids,
                    probe_max_tokens=cfg.probe_max_tokens,
                    reason="trial_answer",
                )
        return None

    def observe_probe(
        self, request_id: str, token_ids: Sequence[int], logprobs: Sequence[float]
    ) -> CoTStep | None:
        """End the reasoning when the trial answer's confidence reaches the threshold."""
        st = self._states.get(request_id)
        if st is None or not st.probing:
            return None
        st.probing = False
        if len(logprobs) != len(token_ids):
            raise ValueError(
                f"{len(token_ids)} trial tokens but {len(logprobs)} logprobs: give one each"
            )
        cut = len(token_ids)
        for i, t in enumerate(token_ids):
            if t in self.config.answer_stop_token_ids:
                cut = i
                break
        conf = trial_confidence(logprobs[:cut], self.config.confidence)
        self.confidences.append(conf)
        if conf < self.config.threshold or not st.span.think_open:
            return None
        st.exited = True
        self.num_exits += 1
        return CoTStep(forced_token_ids=self.config.end_token_ids, reason="early_exit")

    def finish(self, request_id: str) -> None:
        """Forget the request."""
        self._states.pop(request_id, None)

    def vote(self, answers: Sequence[str | None], num_planned: int) -> CoTVote:
        """Plain majority once every planned sample is in."""
        return majority_vote(answers, num_planned)

    def extract_answer(self, text: str) -> str | None:
        """The answer ``text`` votes for, read as ``config.answer`` says."""
        return self._extract(text)

    def make_stats(self) -> dict[str, int]:
        """Trials asked for and early exits since the last call (counters reset)."""
        stats = {"num_probes": self.num_probes, "num_exits": self.num_exits}
        self.num_probes = self.num_exits = 0
        return stats
