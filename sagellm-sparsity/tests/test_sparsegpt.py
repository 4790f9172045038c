"""sparsegpt: the OBS update against masks alone, exact special cases."""

from __future__ import annotations

import pytest
import torch

from sagellm.core.testing.quantizer import activations, make_linear
from sagellm.sparsity.config import SparseGPTConfig
from sagellm.sparsity.masks import is_nm_sparse, row_mask
from sagellm.sparsity.sparsegpt import SparseGPTSparsifier, sparsegpt_prune


def _output_error(w: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ w.t() - x @ w2.t()).norm() / (x @ w.t()).norm())


def test_zero_sparsity_keeps_the_weight() -> None:
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    x = activations(16, 64, seed=1)
    assert torch.allclose(sparsegpt_prune(w, x.t() @ x, sparsity=0.0), w, atol=1e-5)


def test_with_uncorrelated_inputs_it_is_magnitude_pruning_per_block() -> None:
    # X^T X = c I: no column can make up for another, and the saliency is w^2 / const
    w = torch.tensor([[0.5, -3.0, 0.1, 2.0], [-0.2, 1.0, -4.0, 0.3]])
    out = sparsegpt_prune(w, 4.0 * torch.eye(4), sparsity=0.5, damp=1e-6)
    assert torch.allclose(out, torch.tensor([[0.0, -3.0, 0.0, 2.0], [0.0, 1.0, -4.0, 0.0]]))


def test_the_update_beats_the_mask_alone_on_correlated_inputs() -> None:
    layer = make_linear(32, 64, seed=3)
    w = layer.weight.detach().clone()
    x = activations(64, 512, seed=4)
    xtx = x.t() @ x
    pruned = sparsegpt_prune(w, xtx, sparsity=0.5)
    assert float((pruned == 0).double().mean()) == 0.5
    masked_only = torch.where(pruned == 0, torch.zeros_like(w), w)
    held = activations(64, 256, seed=5)
    assert _output_error(w, pruned, held) < 0.9 * _output_error(w, masked_only, held)
    # within 25% of the least-squares optimum of the same mask (SparseGPT approximates it)
    optimum = torch.zeros_like(w)
    for r in range(w.shape[0]):
        k = pruned[r] != 0
        optimum[r, k] = torch.linalg.solve(xtx[k][:, k], xtx[k] @ w[r])
    assert _output_error(w, pruned, held) < 1.25 * _output_error(w, optimum, held)
    # and beats the per-row magnitude mask
    by_magnitude = torch.where(row_mask(w.abs(), 0.5), torch.zeros_like(w), w)
    assert _output_error(w, pruned, held) < 0.6 * _output_error(w, by_magnitude, held)


def test_2_of_4_holds_across_blocks() -> None:
    w = make_linear(16, 96, seed=6).weight.detach()
    x = activations(96, 256, seed=7)
    pruned = sparsegpt_prune(w, x.t() @ x, nm=(2, 4), block_size=32)
    assert is_nm_sparse(pruned, 2, 4)
    assert float((pruned == 0).double().mean()) == 0.5


def test_dead_input_channels_get_zero_weights() -> None:
    w = torch.ones(2, 4)
    x = torch.tensor([[1.0, 0.0, 2.0, 1.0], [0.5, 0.0, 1.0, -1.0], [2.0, 0.0, 0.0, 1.0]])
    out = sparsegpt_prune(w, x.t() @ x, sparsity=0.0)
    assert out[:, 1].tolist() == [0.0, 0.0]


def test_errors_say_what_fits() -> None:
    with pytest.raises(ValueError, match=r"a Hessian of shape \[3, 3\] does not fit 4 input"):
        sparsegpt_prune(torch.ones(2, 4), torch.eye(3))
    with pytest.raises(ValueError, match="block_size 6 and the 8 input columns must be multiples"):
        sparsegpt_prune(torch.ones(2, 8), torch.eye(8), nm=(2, 4), block_size=6)


def test_block_size_is_rounded_to_the_pattern() -> None:
    layer = make_linear(8, 24, seed=8)
    s = SparseGPTSparsifier(
        SparseGPTConfig(pattern="4:8", block_size=20, calibration_tokens=64),
        tokenize=lambda t: list(t.encode()),
    )
    layers = {"layers.0.o_proj": layer}
    s.prepare(layers, lambda ids: layer(activations(24, len(ids), seed=len(ids))))
    s.apply(layers)
    assert is_nm_sparse(layer.weight, 4, 8)
