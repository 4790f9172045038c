"""Sampler: every knob on crafted logits, seeded reproducibility, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.core.types import SamplingParams
from sagellm.engine.sampler import Sampler, SamplingRow, mix_seed

GREEDY = SamplingParams(temperature=0.0)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def row(params: SamplingParams, seed: int = 0, prompt=(), output=()) -> SamplingRow:
    return SamplingRow(params, seed, tuple(prompt), tuple(output))


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 300) -> list[int]:
    """Token picked for seeds 0..n-1 (one row each, in one batch)."""
    batch = logits.expand(n, -1).clone()
    return Sampler()(batch, [row(params, seed=s) for s in range(n)]).token_ids


def test_greedy_takes_the_argmax_of_each_row() -> None:
    logits = torch.tensor([[0.1, 2.0, 0.5], [3.0, 1.0, 2.0], [-1.0, -3.0, -0.5]])
    out = Sampler()(logits, [row(GREEDY)] * 3)
    assert out.token_ids == [1, 0, 2]
    assert out.sampled_logprobs == [None, None, None]
    assert out.top_logprobs == [None, None, None]


def test_greedy_rows_stay_greedy_in_a_mixed_batch() -> None:
    logits = torch.tensor([[0.1, 2.0, 0.5], [0.0, 0.0, 0.0], [3.0, 1.0, 2.0]])
    params = [GREEDY, SamplingParams(temperature=1.0), GREEDY]
    out = Sampler()(logits, [row(p, seed=i) for i, p in enumerate(params)])
    assert out.token_ids[0] == 1 and out.token_ids[2] == 0


def test_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3\) do not match 1 sampling rows"):
        Sampler()(torch.zeros(2, 3), [row(GREEDY)])


def test_temperature_sampling_follows_the_distribution() -> None:
    probs = [0.6, 0.3, 0.1]
    picks = draws(logits_of(probs), SamplingParams(temperature=1.0), n=3000)
    freq = [picks.count(i) / len(picks) for i in range(3)]
    for got, want in zip(freq, probs):
        assert abs(got - want) < 0.04, (freq, probs)


def test_low_temperature_concentrates_on_the_top_token() -> None:
    picks = draws(logits_of([0.4, 0.35, 0.25]), SamplingParams(temperature=0.01))
    assert set(picks) == {0}


def test_high_temperature_flattens() -> None:
    picks = draws(logits_of([0.9, 0.05, 0.05]), SamplingParams(temperature=50.0), n=600)
    assert min(picks.count(i) for i in range(3)) > 120  # near-uniform: ~200 each


def test_top_k_keeps_only_the_k_best() -> None:
    logits = logits_of([0.05, 0.4, 0.1, 0.3, 0.15])
    assert set(draws(logits, SamplingParams(top_k=1))) == {1}
    assert set(draws(logits, SamplingParams(top_k=2))) == {1, 3}
    assert set(draws(logits, SamplingParams(top_k=3))) == {1, 3, 4}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    # mass before each token: 0, 0.5, 0.8, 0.95 -> kept while it is below top_p
    assert set(draws(logits, SamplingParams(top_p=0.5))) == {0}
    assert set(draws(logits, SamplingParams(top_p=0.7))) == {0, 1}
    assert set(draws(logits, SamplingParams(top_p=0.85))) == {0, 1, 2}


def test_top_k_and_top_p_together() -> None:
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert set(draws(logits, SamplingParams(top_k=2, top_p=0.95))) == {0, 1}
    assert set(draws(logits, SamplingParams(top_k=3, top_p=0.6))) == {0, 1}


def test_min_p_drops_tokens_below_a_fraction_of_the_top() -> None:
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert set(draws(logits, SamplingParams(min_p=0.5))) == {0, 1}  # threshold 0.25
    assert set(draws(logits, SamplingParams(min_p=0.2))) == {0, 1, 2}  # threshold 0.10


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    # 2.0 / 1.2 = 1.67 < 1.9: the repeated token loses
    assert Sampler()(torch.tensor([[2.0, 1.9, 0.0]]), [row(params, prompt=[0])]).token_ids == [1]
    # -1.0 * 1.2 = -1.2 < -1.1
    assert Sampler()(torch.tensor([[-1.0, -1.1, -5.0]]), [row(params, output=[0])]).token_ids == [1]
    # tokens not seen are untouched
    assert Sampler()(torch.tensor([[2.0, 1.9, 0.0]]), [row(params, prompt=[2])]).token_ids == [0]


def test_presence_penalty_counts_a_token_once() -> None:
    logits = torch.tensor([[1.0, 0.9]])
    p = SamplingParams(temperature=0.0, presence_penalty=0.2)
    assert Sampler()(logits, [row(p, output=[0])]).token_ids == [1]  # 0.8 < 0.9
    p = SamplingParams(temperature=0.0, presence_penalty=0.05)
    assert Sampler()(logits, [row(p, output=[0, 0, 0])]).token_ids == [0]  # 0.95 > 0.9


def test_frequency_penalty_counts_every_occurrence() -> None:
    logits = torch.tensor([[1.0, 0.9]])
    p = SamplingParams(temperature=0.0, frequency_penalty=0.06)
    assert Sampler()(logits, [row(p, output=[0])]).token_ids == [0]  # 0.94
    assert Sampler()(logits, [row(p, output=[0, 0])]).token_ids == [1]  # 0.88


def test_presence_and_frequency_ignore_the_prompt() -> None:
    logits = torch.tensor([[1.0, 0.9]])
    p = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    assert Sampler()(logits, [row(p, prompt=[0, 0, 0])]).token_ids == [0]


def test_penalties_apply_per_row() -> None:
    logits = torch.tensor([[1.0, 0.9], [1.0, 0.9]])
    rows = [
        row(SamplingParams(temperature=0.0, presence_penalty=0.2), output=[0]),
        row(GREEDY, output=[0]),
    ]
    assert Sampler()(logits, rows).token_ids == [1, 0]


def test_same_seed_and_index_give_the_same_token_in_any_batch() -> None:
    torch.manual_seed(0)
    vocab = 50
    base = torch.randn(vocab)
    params = SamplingParams(temperature=1.0)
    alone = [
        Sampler()(base.view(1, -1), [row(params, seed=7, output=[0] * i)]).token_ids[0]
        for i in range(20)
    ]
    in_batch = []
    for i in range(20):
        others = torch.randn(5, vocab)
        batch = torch.cat([others[: i % 5], base.view(1, -1), others[i % 5 :]])
        rows = [row(params, seed=100 + j) for j in range(6)]
        rows[i % 5] = row(params, seed=7, output=[0] * i)
        in_batch.append(Sampler()(batch, rows).token_ids[i % 5])
    assert in_batch == alone
    assert len(set(alone)) > 3  # the index changes the draw


def test_different_seeds_give_different_streams() -> None:
    logits = torch.zeros(1, 1000)
    params = SamplingParams(temperature=1.0)
    a = [Sampler()(logits, [row(params, seed=1, output=[0] * i)]).token_ids[0] for i in range(10)]
    b = [Sampler()(logits, [row(params, seed=2, output=[0] * i)]).token_ids[0] for i in range(10)]
    assert a != b


def test_mix_seed_is_deterministic_and_spreads() -> None:
    assert mix_seed(1, 2) == mix_seed(1, 2)
    values = {mix_seed(s, i) for s in range(10) for i in range(10)}
    assert len(values) == 100
    assert all(0 <= v < 2**63 for v in values)


def test_logprobs_come_from_the_raw_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    expected = torch.log_softmax(logits, dim=-1)[0]
    p = SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=2.5)
    out = Sampler()(logits, [row(p, prompt=[0])])
    # the penalty moves the argmax to token 1, logprobs stay those of the model
    assert out.token_ids == [1]
    assert out.sampled_logprobs[0] == pytest.approx(expected[1].item())
    assert out.top_logprobs[0] == pytest.approx({0: expected[0].item(), 1: expected[1].item()})
    assert list(out.top_logprobs[0]) == [0, 1]


def test_logprobs_include_the_sampled_token_outside_the_top_k() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    expected = torch.log_softmax(logits, dim=-1)[0]
    p = SamplingParams(temperature=0.0, logprobs=1, presence_penalty=2.0)
    out = Sampler()(logits, [row(p, output=[0, 1])])
    assert out.token_ids == [2]
    assert out.top_logprobs[0] == pytest.approx({0: expected[0].item(), 2: expected[2].item()})


def test_logprobs_zero_returns_only_the_sampled_token() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    params = [SamplingParams(temperature=0.0, logprobs=0), GREEDY]
    out = Sampler()(logits, [row(p) for p in params])
    lp = torch.log_softmax(logits, dim=-1)
    assert out.top_logprobs == [pytest.approx({0: lp[0, 0].item()}), None]
    assert out.sampled_logprobs[1] is None


def test_greedy_fast_path_agrees_with_the_general_path() -> None:
    torch.manual_seed(3)
    logits = torch.randn(8, 300)
    fast = Sampler()(logits, [row(GREEDY)] * 8).token_ids
    slow = Sampler()(logits, [row(SamplingParams(temperature=0.0, logprobs=0))] * 8).token_ids
    assert fast == slow == logits.argmax(-1).tolist()


def test_logits_are_not_modified() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    before = logits.clone()
    Sampler()(logits, [row(SamplingParams(top_k=1, repetition_penalty=3.0), prompt=[0])])
    assert torch.equal(logits, before)


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(2, 40),
    top_k=st.integers(0, 40),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.9),
    temperature=st.floats(0.1, 3.0),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_sampled_token_survives_every_filter(
    vocab: int, top_k: int, top_p: float, min_p: float, temperature: float, seed: int, data
) -> None:
    # Logits on a 1e-3 grid: distinct values stay distinct probabilities in float32 (two
    # floats like -6e-30 and 0.0 would tie after softmax and make the ranks ambiguous).
    values = data.draw(
        st.lists(st.integers(-8000, 8000), min_size=vocab, max_size=vocab, unique=True)
    )
    logits = torch.tensor([[v / 1000.0 for v in values]])
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    token = Sampler()(logits, [row(p, seed=seed)]).token_ids[0]
    probs = torch.softmax(logits[0] / temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    rank = order.index(token)
    if 0 < top_k < vocab:
        assert rank < top_k
    assert probs[token] >= min_p * probs.max() - 1e-6
    # top-p acts on what min-p and top-k left, renormalised
    k = top_k if 0 < top_k < vocab else vocab
    kept = [t for t in order[:k] if probs[t] >= min_p * probs.max()]
    mass_before = sum(probs[t].item() for t in kept[: kept.index(token)])
    assert mass_before / sum(probs[t].item() for t in kept) < top_p + 1e-5
