"""Chain-of-thought control in the engine on a tiny model: forced tokens, trials, windows."""

from __future__ import annotations

import pytest

pytest.importorskip("sagellm.cot")

from sagellm.core.errors import InvalidRequestError
from sagellm.core.types import FinishReason, SamplingParams
from sagellm.engine.cot import CoTOptions

from .conftest import assert_no_leak, make_llm

PROMPT = [5, 6, 7, 8, 9]
END = (40, 41)  # the closing marker, as token ids


@pytest.fixture(scope="module")
def llm(tiny_model):
    llm = make_llm(tiny_model, num_blocks=256, max_num_seqs=32, max_num_batched_tokens=256)
    llm.engine.cot.configure(start_token_ids=(), end_token_ids=END)
    return llm


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def plain(llm, prompt, n) -> list[int]:
    return llm.generate([prompt], greedy(n))[0].outputs[0].token_ids


def test_the_budget_forces_the_end_marker_through_the_normal_token_path(llm) -> None:
    free = plain(llm, PROMPT, 12)
    (out,) = llm.generate([PROMPT], greedy(12, thinking_token_budget=5))
    toks = out.outputs[0].token_ids
    assert toks[:5] == free[:5] and toks[5:7] == list(END)
    # what follows the forced marker is what the model says after it: the KV is right
    assert toks[7:] == plain(llm, PROMPT + toks[:7], 5)
    assert_no_leak(llm)


def test_a_budget_counts_from_the_start_marker(llm) -> None:
    free = plain(llm, PROMPT, 12)
    llm.engine.cot.configure(start_token_ids=(free[2],), end_token_ids=END)
    try:
        (out,) = llm.generate([PROMPT], greedy(12, thinking_token_budget=3))
    finally:
        llm.engine.cot.configure(start_token_ids=(), end_token_ids=END)
    toks = out.outputs[0].token_ids
    opened = toks.index(free[2]) + 1
    assert toks[: opened + 3] == free[: opened + 3] and toks[opened + 3 : opened + 5] == list(END)


def test_n_samples_each_keep_their_own_budget(llm) -> None:
    sp = SamplingParams(
        temperature=1.0, max_tokens=10, ignore_eos=True, n=3, seed=1, thinking_token_budget=4
    )
    (out,) = llm.generate([PROMPT], sp)
    starts = []
    for c in out.outputs:
        ids = list(c.token_ids)
        # the end marker begins within each sample's own budget: forced at token 4, or
        # earlier where the sample drew its first token itself
        starts.append(next(i for i in range(len(ids) - 1) if ids[i : i + 2] == list(END)))
    assert all(k <= 4 for k in starts) and 4 in starts, starts


def test_budget_zero_forces_the_marker_first(llm) -> None:
    (out,) = llm.generate([PROMPT], greedy(4, thinking_token_budget=0))
    assert out.outputs[0].token_ids[:2] == list(END)


def test_a_confident_trial_at_a_transition_ends_the_reasoning(llm) -> None:
    free = plain(llm, PROMPT, 16)
    wait = free[3]
    cot = CoTOptions.model_validate(
        {
            "early_exit": {
                "transition_token_ids": [[wait]],
                "answer_prompt_token_ids": [50, 51],
                "threshold": 1e-9,
                "probe_max_tokens": 2,
            }
        }
    )
    before = llm.engine.cot.make_stats()["num_trials"]
    (out,) = llm.generate([PROMPT], greedy(16), cot=cot)
    toks = out.outputs[0].token_ids
    first = free.index(wait)
    # the trial runs beside the request (prefill + 2 tokens), then the marker is forced
    assert toks[: first + 3] == free[: first + 3]
    assert toks[first + 3 : first + 5] == list(END)
    assert llm.engine.cot.make_stats()["num_trials"] == before + 1
    assert len(out.outputs) == 1
    assert_no_leak(llm)


def test_an_unsure_trial_changes_nothing(llm) -> None:
    free = plain(llm, PROMPT, 16)
    cot = CoTOptions.model_validate(
        {
            "early_exit": {
                "transition_token_ids": [[free[3]]],
                "answer_prompt_token_ids": [50],
                "threshold": 1.0,
                "probe_max_tokens": 3,
            }
        }
    )
    (out,) = llm.generate([PROMPT], greedy(16), cot=cot)
    assert out.outputs[0].token_ids == free
    assert_no_leak(llm)


def test_esc_stops_after_one_unanimous_window(llm) -> None:
    sc = {"n": 16, "method": "esc", "window": 4, "options": {"answer": {"method": "text"}}}
    (out,) = llm.generate([PROMPT], greedy(6), cot={"self_consistency": sc})
    assert len(out.outputs) == 4 and out.finished
    vote = out.consistency
    assert vote is not None and vote.stop and vote.num_samples == 4 and vote.num_votes == 4
    assert vote.answer == out.outputs[0].text.strip().rstrip(".").strip().lower()
    assert_no_leak(llm)


def test_windows_draw_the_same_samples_as_one_full_batch(llm) -> None:
    sp = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=7)
    full = llm.generate(
        [PROMPT], sp, cot={"self_consistency": {"n": 8, "method": "majority", "window": 8}}
    )[0]
    windows = llm.generate(
        [PROMPT], sp, cot={"self_consistency": {"n": 8, "method": "majority", "window": 3}}
    )[0]
    assert [c.token_ids for c in windows.outputs] == [c.token_ids for c in full.outputs]
    assert full.consistency == windows.consistency and full.consistency.num_samples == 8
    assert_no_leak(llm)


def test_abort_in_the_middle_of_the_windows_frees_everything(llm) -> None:
    eng = llm.engine
    eng.add_request(
        "sc-abort",
        PROMPT,
        greedy(30),
        cot=CoTOptions.model_validate({"self_consistency": {"n": 8, "window": 2}}),
    )
    for _ in range(3):
        eng.step()
    (out,) = eng.abort_request("sc-abort")
    assert all(c.finish_reason is FinishReason.ABORT for c in out.outputs)
    assert_no_leak(llm)


def test_self_consistency_and_n_together_are_refused(llm) -> None:
    with pytest.raises(InvalidRequestError, match="give the count as self_consistency.n only"):
        llm.generate([PROMPT], SamplingParams(n=2), cot={"self_consistency": {"n": 4}})


def test_the_budget_holds_with_speculative_decoding(tiny_model) -> None:
    spec = make_llm(
        tiny_model,
        num_blocks=256,
        speculative_config={"method": "ngram", "num_speculative_tokens": 4},
    )
    spec.engine.cot.configure(start_token_ids=(), end_token_ids=END)
    asked: list[str] = []
    real = spec.engine.speculative.propose

    def propose(requests):
        asked.extend(r.request_id for r in requests)
        return real(requests)

    spec.engine.speculative.propose = propose
    prompt = [5, 6, 7, 8, 9, 10, 11] * 2 + [5, 6, 7]
    free = spec.generate([prompt], greedy(16))[0].outputs[0].token_ids
    assert asked, "the plain request is offered to the proposer"
    asked.clear()
    (out,) = spec.generate([prompt], greedy(16, thinking_token_budget=5))
    toks = out.outputs[0].token_ids
    assert toks[:5] == free[:5] and toks[5:7] == list(END)
    assert asked == []  # a controlled request gets no drafts
