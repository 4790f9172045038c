"""DEER-style early exit with a scripted reasoner whose trial answers are known."""

from __future__ import annotations

import math

import pytest

from sagellm.core.types import CoTStep
from sagellm.cot import DeerConfig, DeerController, trial_confidence
from sagellm.cot.simulate import ScriptedReasoner, generate

START, END, EOS, WAIT, ALT1, ALT2, ANS = 3, 4, 2, 6, 7, 8, 9
# reasoning with transitions after 3 tokens ("Wait"), 6 tokens ("Alt ernatively"), 9 ("Wait")
REASONING = [START, 10, 11, WAIT, 12, ALT1, ALT2, 13, 14, WAIT, 15, 16]
ANSWER = [30, 31]


def lp(p: float) -> float:
    return math.log(p)


def deer(**kw) -> DeerController:
    opts: dict = dict(
        start_token_ids=(START,),
        end_token_ids=(END,),
        transition_token_ids=((WAIT,), (ALT1, ALT2)),
        answer_prompt_token_ids=(END, ANS),
        probe_max_tokens=4,
        answer_stop_token_ids=(EOS,),
        threshold=0.9,
    )
    opts.update(kw)
    return DeerController(DeerConfig(**opts))


def reasoner(trials: dict) -> ScriptedReasoner:
    return ScriptedReasoner(REASONING, ANSWER, (END,), EOS, trials=trials)


UNSURE = ([30, EOS], [lp(0.5), lp(0.99)])
SURE = ([30, 31, EOS], [lp(0.95), lp(0.97), lp(0.01)])  # EOS and after are not scored


def test_a_confident_trial_at_a_transition_ends_the_reasoning() -> None:
    m = reasoner({4: UNSURE, 7: SURE})
    ctl = deer()
    trace = generate(m, [ctl], [1], max_tokens=64, eos_token_ids=[EOS])
    # trial after "Wait" (4 tokens out) is unsure; after "Alt ernatively" (7) it is sure
    assert trace.probes == [4, 7]
    assert trace.token_ids == [START, 10, 11, WAIT, 12, ALT1, ALT2, END, *ANSWER, EOS]
    assert trace.reasons == ["trial_answer", "trial_answer", "early_exit"]
    assert ctl.confidences == pytest.approx([0.5, 0.96])
    assert ctl.make_stats() == {"num_probes": 2, "num_exits": 1}


def test_unsure_trials_leave_the_reasoning_as_it_was() -> None:
    m = reasoner({4: UNSURE, 7: UNSURE, 10: UNSURE})
    trace = generate(m, [deer()], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.probes == [4, 7, 10]
    assert trace.token_ids == [*REASONING, END, *ANSWER, EOS]
    assert trace.num_forced == 0


def test_min_confidence_is_stricter_than_mean() -> None:
    mixed = ([30, 31], [lp(0.99), lp(0.85)])  # mean 0.92, min 0.85
    trace = generate(reasoner({4: mixed}), [deer()], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.token_ids[:5] == [START, 10, 11, WAIT, END]
    trace = generate(
        reasoner({4: mixed}), [deer(confidence="min")], [1], max_tokens=64, eos_token_ids=[EOS]
    )
    assert END not in trace.token_ids[:12]


def test_max_probes_and_min_reasoning_tokens_limit_the_trials() -> None:
    m = reasoner({})
    trace = generate(m, [deer(max_probes=1)], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.probes == [4]
    trace = generate(m, [deer(min_reasoning_tokens=5)], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.probes == [7, 10]  # the first "Wait" comes after only 3 reasoning tokens


def test_no_trial_outside_the_reasoning() -> None:
    # a transition token in the answer (after the end marker) asks for nothing
    m = ScriptedReasoner([START, 10, END], [WAIT, 31], (END,), EOS)
    trace = generate(m, [deer()], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.probes == [] and trace.token_ids == [START, 10, END, WAIT, 31, EOS]


def test_one_trial_at_a_time_and_late_answers_are_checked() -> None:
    ctl = deer()
    ctl.start("r", [1])
    step = ctl.step("r", [START, 10, WAIT])
    assert step == CoTStep(probe_token_ids=(END, ANS), probe_max_tokens=4, reason="trial_answer")
    assert ctl.step("r", [START, 10, WAIT, 11, WAIT]) is None  # the first trial still runs
    with pytest.raises(ValueError, match="2 trial tokens but 1 logprobs"):
        ctl.observe_probe("r", [30, 31], [-0.1])
    assert ctl.observe_probe("r", [30], [-0.01]) is None  # no trial is running any more
    # the reasoning closed by itself while a trial ran: nothing to force
    ctl.step("r", [START, 10, WAIT, 11, WAIT, 12, WAIT])
    ctl.step("r", [START, 10, WAIT, 11, WAIT, 12, WAIT, END])
    assert ctl.observe_probe("r", [30], [-0.01]) is None


def test_trial_confidence_measures() -> None:
    assert trial_confidence([]) == 0.0
    assert trial_confidence([lp(0.5), lp(1.0)]) == pytest.approx(0.75)
    assert trial_confidence([lp(0.5), lp(1.0)], "min") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="use 'mean' or 'min'"):
        trial_confidence([0.0], "max")
