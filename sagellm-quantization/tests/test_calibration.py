"""The shipped text and the statistics the pre-hooks collect."""

from __future__ import annotations

import pytest
import torch

from sagellm.core.testing.quantizer import make_linear
from sagellm.quantization.calibration import calibration_sequences, collect_stats, shipped_text


def test_the_text_ships_in_two_distinct_parts() -> None:
    cal, held = shipped_text("calibration"), shipped_text("heldout")
    assert len(cal) > 8000 and len(held) > 2500
    assert "def " in cal and "def " in held  # code as well as prose
    paragraphs = {p.strip() for p in cal.split("\n\n") if p.strip()}
    assert not any(p.strip() in paragraphs for p in held.split("\n\n") if p.strip())
    with pytest.raises(ValueError, match="'calibration' and 'heldout'"):
        shipped_text("test")  # type: ignore[arg-type]


def test_sequences_cut_the_text_and_stop_at_num_tokens() -> None:
    def tokenize(text: str) -> list[int]:
        return list(text.encode())

    seqs = calibration_sequences(tokenize, num_tokens=1000, seq_len=300)
    assert [len(s) for s in seqs] == [300, 300, 300, 100]
    assert sum(seqs, []) == tokenize(shipped_text())[:1000]
    with pytest.raises(ValueError, match="build the quantizer with tokenize="):
        calibration_sequences(None, num_tokens=10, seq_len=5, who="gptq")
    with pytest.raises(ValueError, match="returned no tokens"):
        calibration_sequences(lambda t: [], num_tokens=10, seq_len=5)


def test_hooks_sum_the_inputs_exactly_and_go_away() -> None:
    a, b = make_linear(16, 32, seed=0), make_linear(16, 64, seed=1)
    xs = {
        "a": [torch.arange(96.0).reshape(3, 32) / 10, -torch.ones(2, 32)],
        "b": [torch.linspace(-1, 1, 64).repeat(4, 1)],
    }
    calls = iter(range(2))

    def run(token_ids: list[int]) -> None:
        i = next(calls)
        a(xs["a"][i])
        if i == 0:
            b(xs["b"][0])

    stats = collect_stats({"a": a, "b": b}, run, [[1, 2], [3]])
    xa = torch.cat(xs["a"])
    sa = stats["a"]
    assert sa.num_rows == 5 and stats["b"].num_rows == 4
    assert sa.xtx is not None and torch.equal(sa.xtx, xa.t() @ xa)
    assert torch.equal(sa.abs_max, xa.abs().amax(dim=0))
    assert torch.allclose(sa.abs_mean, xa.abs().mean(dim=0))
    assert not a._forward_pre_hooks and not b._forward_pre_hooks


def test_hooks_are_removed_when_the_run_fails() -> None:
    a = make_linear(16, 32)

    def run(token_ids: list[int]) -> None:
        a(torch.ones(1, 32))
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        collect_stats({"a": a}, run, [[1]])
    assert not a._forward_pre_hooks
    with pytest.raises(ValueError, match=r"needs run\(token_ids\)"):
        collect_stats({"a": a}, None, [[1]], who="awq")
