"""The shipped text and the input statistics of calibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sagellm.core.testing.quantizer import make_linear
from sagellm.sparsity.calibration import calibration_sequences, collect_stats, shipped_text


def test_shipped_text_parts() -> None:
    cal, held = shipped_text("calibration"), shipped_text("heldout")
    assert cal.startswith("Four score and seven years ago")
    assert held.startswith("To Sherlock Holmes she is always the woman.")
    assert 6_000 < len(cal) < 10_000 and 2_500 < len(held) < 5_000
    assert held[:200] not in cal
    with pytest.raises(ValueError, match="has parts 'calibration' and 'heldout', not 'train'"):
        shipped_text("train")  # type: ignore[arg-type]


def test_calibration_sequences_cut_the_text() -> None:
    seqs = calibration_sequences(lambda t: list(t.encode()), num_tokens=1000, seq_len=300)
    assert [len(s) for s in seqs] == [300, 300, 300, 100]
    assert bytes(seqs[0][:11]) == b"Four score "
    with pytest.raises(ValueError) as info:
        calibration_sequences(None, num_tokens=10, seq_len=5, who="wanda")
    assert str(info.value) == (
        "wanda runs the model over the package's calibration text and needs its token ids: "
        "build the sparsifier with tokenize=<callable str -> list[int]> (the model's tokenizer)"
    )


def test_collect_stats_sums_exactly() -> None:
    layer = make_linear(3, 2)
    x1 = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    x2 = torch.tensor([[0.0, 2.0]])
    inputs = {0: x1, 1: x2}
    stats = collect_stats({"a": layer}, lambda ids: layer(inputs[ids[0]]), [[0], [1]])["a"]
    assert stats.num_rows == 3
    assert stats.total.tolist() == [4.0, 0.0]
    assert stats.sq_total.tolist() == [10.0, 8.0]
    assert stats.xtx is not None and stats.xtx.tolist() == [[10.0, -2.0], [-2.0, 8.0]]
    assert torch.allclose(stats.variance, torch.tensor([10 / 3 - 16 / 9, 8 / 3]))
    assert not layer._forward_pre_hooks  # hooks removed


def test_a_run_that_misses_a_layer_is_an_error() -> None:
    a, b = make_linear(2, 2), make_linear(2, 2)
    with pytest.raises(ValueError) as info:
        collect_stats({"a": a, "b": b}, lambda ids: a(torch.ones(1, 2)), [[1]], who="sparsegpt")
    assert str(info.value) == (
        "sparsegpt: run(token_ids) never called 1 of the layers (first: 'b'); it must run "
        "the model those layers belong to"
    )
    with pytest.raises(ValueError, match="prepare\\(layers, run\\) needs run"):
        collect_stats({"a": a}, None, [[1]])
    with pytest.raises(ValueError, match="neither input_size nor a 2-D weight"):
        collect_stats({"x": nn.ReLU()}, lambda ids: None, [[1]])
