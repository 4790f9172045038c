"""Conformance suite of :class:`sagellm.core.protocols.CoTController`.

Every controller answers both hooks: token level (``start``/``step``/``observe_probe``/
``finish``) and sample level (``vote``). The suite drives the token hooks with random
token streams the way the engine does (forced tokens are emitted before the controller is
asked again) and checks the vote's contract with random answer lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sagellm.core.protocols import CoTController
from sagellm.core.types import CoTStep, CoTVote

__all__ = ["CoTControllerConformance", "drive"]

_answers = st.lists(st.one_of(st.none(), st.sampled_from(["1", "2", "3", "x"])), max_size=24)


def _check_step(step: object, vocab_size: int) -> None:
    assert step is None or isinstance(step, CoTStep), f"a step returned {step!r}"
    if step is None:
        return
    for tok in (*step.forced_token_ids, *step.probe_token_ids):
        assert isinstance(tok, int) and 0 <= tok < vocab_size, (
            f"token {tok!r} outside the vocabulary"
        )
    if step.probe_token_ids:
        assert step.probe_max_tokens >= 1, "a trial branch needs probe_max_tokens >= 1"


def drive(
    controller: CoTController,
    stream: Sequence[int],
    prompt: Sequence[int],
    *,
    vocab_size: int,
    request_id: str = "r",
    trial: tuple[Sequence[int], Sequence[float]] = ((), ()),
) -> list[int]:
    """Run ``controller`` over a model that writes ``stream``; the tokens emitted.

    Forced tokens replace the stream's tokens one per step; a trial branch returns
    ``trial`` at once; ``stop`` ends the run once the forced tokens are out. A controller
    that forces more than ``64 + 4 * len(stream)`` tokens fails (it would never let go).
    """
    out: list[int] = []
    pending: list[int] = []
    stop = False
    num_forced = 0
    source = iter(stream)

    def take(step: CoTStep | None) -> None:
        nonlocal stop
        while step is not None:
            _check_step(step, vocab_size)
            if step.forced_token_ids or step.stop:
                pending[:] = step.forced_token_ids
                stop = step.stop
                return
            if not step.probe_token_ids:
                return
            step = controller.observe_probe(request_id, list(trial[0]), list(trial[1]))

    take(controller.start(request_id, prompt))
    while True:
        if stop and not pending:
            break
        if pending:
            out.append(pending.pop(0))
            num_forced += 1
            assert num_forced <= 64 + 4 * len(stream), "the controller forces without end"
        else:
            tok = next(source, None)
            if tok is None:
                break
            out.append(tok)
        if not pending:
            take(controller.step(request_id, list(out)))
    controller.finish(request_id)
    return out


class CoTControllerConformance:
    """Subclass and implement ``make_controller()``; pytest runs the inherited tests.

    Class attributes: ``vocab_size`` bounds the random token streams (the controller's
    marker ids must be below it), ``max_examples`` the hypothesis examples per property.
    """

    vocab_size: ClassVar[int] = 16
    max_examples: ClassVar[int] = 60

    def make_controller(self) -> CoTController:
        raise NotImplementedError

    # ------------------------------------------------------------------ shape

    def test_implements_the_protocol(self) -> None:
        ctl = self.make_controller()
        assert isinstance(ctl, CoTController)
        assert issubclass(type(ctl).config_class, BaseModel)

    # ------------------------------------------------------------------ token hooks

    def test_finish_of_an_unknown_request_is_ignored(self) -> None:
        self.make_controller().finish("never-started")

    def test_step_of_an_unknown_request_is_none_or_key_error(self) -> None:
        ctl = self.make_controller()
        try:
            step = ctl.step("never-started", [1, 2])
        except KeyError:
            return
        assert step is None

    def test_observe_probe_of_an_unknown_request_is_none(self) -> None:
        assert self.make_controller().observe_probe("never-started", [1], [-0.1]) is None

    def test_a_request_can_start_again_after_finish(self) -> None:
        ctl = self.make_controller()
        _check_step(ctl.start("r", [1, 2, 3]), self.vocab_size)
        ctl.finish("r")
        _check_step(ctl.start("r", [1, 2, 3]), self.vocab_size)
        ctl.finish("r")

    def test_random_streams_keep_the_step_contract(self) -> None:
        vocab = self.vocab_size

        @settings(max_examples=self.max_examples, deadline=None)
        @given(
            stream=st.lists(st.integers(0, vocab - 1), max_size=64),
            prompt=st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8),
            confident=st.booleans(),
        )
        def run(stream: list[int], prompt: list[int], confident: bool) -> None:
            ctl = self.make_controller()
            trial = ([1, 2], [-0.001, -0.001]) if confident else ([1, 2], [-5.0, -5.0])
            out = drive(ctl, stream, prompt, vocab_size=vocab, trial=trial)
            again = drive(ctl, stream, prompt, vocab_size=vocab, trial=trial)
            assert again == out, "the same stream must give the same tokens after finish"

        run()

    def test_two_requests_do_not_share_state(self) -> None:
        stream = list(range(self.vocab_size)) * 3
        alone = drive(self.make_controller(), stream, [1], vocab_size=self.vocab_size)
        ctl = self.make_controller()
        ctl.start("other", [1])
        for n in (1, 2, 3):
            ctl.step("other", stream[:n])
        beside = drive(ctl, stream, [1], vocab_size=self.vocab_size, request_id="b")
        ctl.finish("other")
        assert beside == alone, "another live request changed this one's tokens"

    # ------------------------------------------------------------------ vote

    def test_vote_refuses_no_planned_samples(self) -> None:
        with pytest.raises(ValueError, match="num_planned"):
            self.make_controller().vote(["1"], 0)

    def test_vote_contract(self) -> None:
        @settings(max_examples=self.max_examples, deadline=None)
        @given(answers=_answers, extra=st.integers(0, 8))
        def run(answers: list[str | None], extra: int) -> None:
            ctl = self.make_controller()
            planned = max(1, len(answers) + extra - 4)
            vote = ctl.vote(answers, planned)
            assert isinstance(vote, CoTVote)
            assert vote.num_samples == len(answers)
            if len(answers) >= planned:
                assert vote.stop, "a rule must stop once every planned sample is in"
            voted = [a for a in answers if a is not None]
            if not voted:
                assert vote.answer is None and vote.num_votes == 0
                return
            counts: dict[Any, int] = {a: voted.count(a) for a in voted}
            assert vote.answer in counts
            assert vote.num_votes == counts[vote.answer] == max(counts.values())
            assert ctl.vote(answers, planned) == vote, "a vote is a function of its inputs"

        run()

    def test_extract_answer_returns_text_or_none(self) -> None:
        ctl = self.make_controller()
        for text in ("", "no answer here", "so the answer is 42.", "\\boxed{7}"):
            got = ctl.extract_answer(text)
            assert got is None or (isinstance(got, str) and got != ""), repr(got)
            assert ctl.extract_answer(text) == got

    def test_vote_ties_go_to_the_answer_seen_first(self) -> None:
        vote = self.make_controller().vote(["2", "1", "1", "2", None], 5)
        assert vote.stop and vote.answer == "2" and vote.num_votes == 2
