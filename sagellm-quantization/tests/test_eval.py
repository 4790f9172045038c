"""The evaluation's metrics on hand-computed cases, and its command line with a fake model."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from sagellm.quantization.eval import (
    evaluate,
    first_divergence,
    kl_per_token,
    main,
    mean_kl,
    parse_spec,
    perplexity,
    summarize,
    token_scores,
    top1_agreement,
)

LN3 = math.log(3.0)


def test_perplexity_of_hand_computed_distributions() -> None:
    uniform = torch.zeros(3, 4)
    assert perplexity(uniform, [0, 1, 2]) == pytest.approx(4.0, abs=1e-12)
    # row 0: p = (1/4, 3/4); the next token is 1 -> ppl = 4/3
    logits = torch.tensor([[0.0, LN3], [0.0, 0.0]])
    assert perplexity(logits, [0, 1]) == pytest.approx(4 / 3, abs=1e-6)
    # two predictions, p = 3/4 and 1/4: exp(-(ln 3/4 + ln 1/4) / 2) = 4 / sqrt(3)
    logits3 = torch.tensor([[0.0, LN3], [LN3, 0.0], [0.0, 0.0]])
    assert perplexity(logits3, [0, 1, 1]) == pytest.approx(4 / math.sqrt(3), abs=1e-6)


def test_kl_of_hand_computed_distributions() -> None:
    ref = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    q = torch.tensor([[0.0, LN3], [1.0, 2.0]])
    # row 0: KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    kl = kl_per_token(ref, q)
    assert kl.dtype == torch.float64
    assert kl[0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-7)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-12)
    assert mean_kl(ref, q) == pytest.approx(0.25 * math.log(4 / 3), abs=1e-7)
    # shifting logits changes nothing
    assert mean_kl(ref + 5.0, q - 2.0) == pytest.approx(mean_kl(ref, q), abs=1e-7)


def test_top1_and_first_divergence() -> None:
    ref = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    q = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert top1_agreement(ref, q) == pytest.approx(2 / 3)
    assert first_divergence(ref, q) == 1
    assert first_divergence(ref, ref) is None
    with pytest.raises(ValueError, match="one shape"):
        top1_agreement(ref, q[:2])


def test_token_scores_and_summary_of_two_windows() -> None:
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    q = torch.tensor([[0.0, LN3], [0.0, 0.0], [0.0, 5.0]])
    ids = [0, 1, 0]
    s = token_scores(ref, q, ids)
    # position 0 predicts token 1: p_ref = 1/2, p_q = 3/4; position 1 predicts 0: 1/2, 1/2
    assert s.nll_ref.tolist() == pytest.approx([math.log(2), math.log(2)])
    assert s.nll_q.tolist() == pytest.approx([math.log(4 / 3), math.log(2)])
    assert s.delta_p.tolist() == pytest.approx([0.25, 0.0])
    assert s.same_top1.tolist() == [False, True]  # argmax of a tie is the first index
    second = token_scores(ref[1:], ref[1:], [1, 0])  # a window without any difference
    r = summarize([second, s])
    assert r.num_tokens == 3
    assert r.ppl_ref == pytest.approx(math.exp(3 * math.log(2) / 3))
    assert r.ppl_q == pytest.approx(math.exp((math.log(2) + math.log(4 / 3) + math.log(2)) / 3))
    assert r.mean_kl == pytest.approx(0.5 * math.log(4 / 3) / 3, abs=1e-7)
    assert r.max_kl == pytest.approx(0.5 * math.log(4 / 3), abs=1e-7)
    assert r.top1_agreement == pytest.approx(2 / 3)
    assert r.rms_delta_p == pytest.approx(math.sqrt(0.25**2 / 3))
    assert r.first_divergence == 1  # the second window's position 0, after one position
    with pytest.raises(ValueError, match="no windows"):
        summarize([])


VOCAB = 11


def _bigram(token_ids: Sequence[int], *, noise: float = 0.0) -> torch.Tensor:
    """Logits favouring token (t * 3 + 1) % VOCAB after t; noise moves them a little."""
    rows = []
    for t in token_ids:
        row = torch.zeros(VOCAB)
        row[(t * 3 + 1) % VOCAB] = 2.0
        if noise:
            row[t % VOCAB] += noise
        rows.append(row)
    return torch.stack(rows)


def test_evaluate_windows_the_tokens() -> None:
    ids = [i % VOCAB for i in range(25)]
    same = evaluate(_bigram, _bigram, ids, seq_len=10)
    assert same.num_tokens == 9 + 9 + 4 and same.mean_kl == 0.0 and same.first_divergence is None
    assert same.ppl_q == pytest.approx(same.ppl_ref)
    off = evaluate(_bigram, lambda t: _bigram(t, noise=3.0), ids, seq_len=10)
    assert off.mean_kl > 0 and off.top1_agreement < 1.0 and off.first_divergence == 0


def test_parse_spec() -> None:
    assert parse_spec("gptq,group_size=64,act_order=true,head=dense") == (
        "gptq",
        {"group_size": 64, "act_order": True, "head": "dense"},
    )
    assert parse_spec("int4") == ("int4", {})
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("int4,64")


def test_main_with_a_fake_loader(capsys: pytest.CaptureFixture[str]) -> None:
    loaded: list[tuple[str, str, str, dict[str, Any]]] = []

    def load(model: str, dtype: str, quantization: str, options: dict[str, Any]) -> Any:
        loaded.append((model, dtype, quantization, dict(options)))
        noise = 0.0 if quantization == "none" else 0.5

        def run(ids: Sequence[int]) -> torch.Tensor:
            return _bigram(ids, noise=noise)

        return run, lambda text: [ord(c) % VOCAB for c in text]

    assert main(["int4,group_size=64", "--max-tokens", "300", "--json"], load=load) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["int4,group_size=64"]) == {"calibration", "heldout"}
    assert out["int4,group_size=64"]["heldout"]["num_tokens"] == 299  # one window
    assert loaded == [
        ("smollm2-135m", "float32", "none", {}),
        ("smollm2-135m", "float32", "int4", {"group_size": 64, "dense_min_rows": None}),
    ]
    assert main(["int4", "--parts", "heldout", "--dtype", "bfloat16"], load=load) == 0
    table = capsys.readouterr().out
    assert "mean KL" in table and "int4" in table and "heldout" in table


def test_main_without_a_loader_says_where_the_model_comes_from(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["int4"]) == 2
    assert "needs a model" in capsys.readouterr().err
