"""The evaluation's metrics and its interleaved timing, on fake models."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from sagellm.sparsity import eval as ev


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_metrics_exact() -> None:
    ref = _logits([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    q = _logits([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 1.0]])
    ids = [7, 0, 1]  # rows 0 and 1 predict tokens 0 and 1
    assert ev.top1_agreement(ref, q) == pytest.approx(2 / 3)
    assert ev.next_token_accuracy(ref, ids) == 1.0
    assert ev.next_token_accuracy(q, ids) == 0.5
    assert ev.mean_kl(ref, ref) == 0.0
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = math.exp(3) / (math.exp(3) + 2)
    assert ev.perplexity(ref, ids) == pytest.approx(math.exp(-(math.log(p0) + math.log(p1)) / 2))
    with pytest.raises(ValueError, match=r"two \[positions, vocab\] tensors of one shape"):
        ev.mean_kl(ref, q[:2])
    with pytest.raises(ValueError, match="at least two tokens"):
        ev.perplexity(ref[:1], [1])


def test_evaluate_quality_windows() -> None:
    vocab = 5

    def model(bias: float):
        def run(ids: Sequence[int]) -> torch.Tensor:
            out = torch.zeros(len(ids), vocab)
            for i, t in enumerate(ids):
                out[i, (t + 1) % vocab] = 4.0  # predicts t + 1
                out[i, 0] += bias
            return out

        return run

    ids = [0, 1, 2, 3, 4, 0, 1]
    same = ev.evaluate_quality(model(0.0), model(0.0), ids, seq_len=4)
    assert same.num_tokens == 5 and same.mean_kl == 0.0 and same.top1_agreement == 1.0
    assert same.accuracy == same.accuracy_dense == 1.0
    off = ev.evaluate_quality(model(0.0), model(9.0), ids, seq_len=4)
    assert off.top1_agreement == pytest.approx(1 / 5)  # only where the answer is 0 anyway
    assert off.accuracy == pytest.approx(1 / 5) and off.mean_kl > 1.0


def _fake(prefill_s: float, decode_s: float, calls: list[str], tag: str) -> ev.LoadedModel:
    import time

    def prefill(ids: Sequence[int]) -> None:
        calls.append(f"{tag}-prefill")
        time.sleep(prefill_s)

    def start_decode(ids: Sequence[int], steps: int):
        calls.append(f"{tag}-start")

        def step() -> None:
            calls.append(f"{tag}-step")
            time.sleep(decode_s)

        return step

    return ev.LoadedModel(
        run=lambda ids: torch.zeros(len(ids), 8),
        tokenize=lambda text: [1, 2, 3],
        prefill=prefill,
        start_decode=start_decode,
        weight_bytes=100,
        pruned_fraction=0.0,
        description="fake",
    )


def test_compare_speed_interleaves_and_takes_ratios() -> None:
    calls: list[str] = []
    dense, pruned = _fake(0.004, 0.006, calls, "d"), _fake(0.002, 0.003, calls, "p")
    report = ev.compare_speed(dense, pruned, [1, 2, 3], decode_steps=2, repeats=2)
    assert calls == [
        "d-prefill", "d-start", "d-step", "d-step",  # warm-up
        "p-prefill", "p-start", "p-step", "p-step",
        "d-prefill", "p-prefill", "d-start", "p-start",  # repeat 0: dense first
        "d-step", "p-step", "p-step", "d-step",  # steps alternate one by one
        "p-prefill", "d-prefill", "p-start", "d-start",  # repeat 1: pruned first
        "p-step", "d-step", "d-step", "p-step",
    ]  # fmt: skip
    assert 1.3 < report.decode_speedup < 2.5 and 1.3 < report.prefill_speedup < 2.5
    assert 100 < report.decode_dense_tok_s < 170
    with pytest.raises(ValueError, match="at least 1"):
        ev.compare_speed(dense, pruned, [1], repeats=0)


def test_main_needs_a_loader(capsys: pytest.CaptureFixture[str]) -> None:
    assert ev.main(["wanda"]) == 2
    assert "sagellm.engine.sparsity_eval" in capsys.readouterr().err


def test_main_prints_a_row_per_spec(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    loaded: list[str | None] = []

    def load(model: str, dtype: str, sparsity: str | None) -> ev.LoadedModel:
        loaded.append(sparsity)
        return _fake(0.0, 0.001, calls, "x")

    assert ev.main(["wanda,sparsity=0.5", "--max-tokens", "3", "--repeats", "1"], load=load) == 0
    out = capsys.readouterr().out
    assert loaded == [None, "wanda,sparsity=0.5"]
    row = [line for line in out.splitlines() if line.startswith("wanda,sparsity=0.5 ")]
    assert len(row) == 1 and "heldout" in row[0] and "1.00x" in row[0]
