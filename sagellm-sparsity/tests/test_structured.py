"""structured: which channels and heads go, the refit, per-block shapes, errors."""

from __future__ import annotations

import pytest
import torch

from sagellm.core.testing.quantizer import activations, make_linear
from sagellm.core.testing.sparsifier import block_forward, tokenize_bytes
from sagellm.core.types import BlockShape
from sagellm.sparsity.calibration import InputStats
from sagellm.sparsity.config import StructuredConfig
from sagellm.sparsity.structured import StructuredSparsifier, refit

H, HEADS, KV, HD, FFN = 16, 4, 2, 4, 32


def _block(index: int, seed: int) -> dict[str, torch.nn.Module]:
    p = f"layers.{index}."
    q, kv = HEADS * HD, KV * HD
    return {
        p + "qkv_proj": make_linear(q + 2 * kv, H, seed=seed, output_sizes=(q, kv, kv)),
        p + "o_proj": make_linear(H, q, seed=seed + 1),
        p + "gate_up_proj": make_linear(2 * FFN, H, seed=seed + 2, output_sizes=(FFN, FFN)),
        p + "down_proj": make_linear(H, FFN, seed=seed + 3),
    }


def _model(num_blocks: int = 2) -> dict[str, torch.nn.Module]:
    layers: dict[str, torch.nn.Module] = {}
    for b in range(num_blocks):
        layers.update(_block(b, 10 * b))
    return layers


def _run(layers: dict[str, torch.nn.Module], num_blocks: int = 2, scale: list[float] | None = None):
    def run(ids: list[int]) -> None:
        x = activations(H, len(ids), seed=len(ids))
        for b in range(num_blocks):
            block_forward(layers, b, x * (scale[b] if scale else 1.0), HEADS)

    return run


def _stats(x: torch.Tensor) -> InputStats:
    s = InputStats(
        x.shape[1],
        torch.zeros(x.shape[1], x.shape[1]),
        torch.zeros(x.shape[1], dtype=torch.float64),
        torch.zeros(x.shape[1], dtype=torch.float64),
    )
    s.add(x)
    return s


def test_least_squares_refit_is_exact_when_removed_inputs_are_redundant() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(200, 3, generator=gen)
    # column 3 = col0 + 2 col1 + 0.5; column 4 constant 2.0
    x = torch.cat(
        [base, (base[:, 0] + 2 * base[:, 1] + 0.5)[:, None], torch.full((200, 1), 2.0)], 1
    )
    w = torch.randn(4, 5, generator=gen)
    keep = torch.tensor([0, 1, 2])
    w2, b2 = refit(w, None, keep, _stats(x), "least_squares", damp=1e-9)
    assert b2 is not None
    assert torch.allclose(x[:, :3] @ w2.t() + b2, x @ w.t(), atol=1e-4)


def test_bias_refit_adds_the_removed_means() -> None:
    x = torch.tensor([[1.0, 2.0, 4.0], [3.0, 2.0, 0.0]])  # means 2, 2, 2
    w = torch.tensor([[1.0, 10.0, 100.0]])
    w2, b2 = refit(w, torch.tensor([0.5]), torch.tensor([0]), _stats(x), "bias", damp=0.01)
    assert w2.tolist() == [[1.0]] and b2 is not None and b2.tolist() == [220.5]
    w3, b3 = refit(w, None, torch.tensor([0, 2]), _stats(x), "none", damp=0.01)
    assert w3.tolist() == [[1.0, 100.0]] and b3 is None


def test_silent_channels_and_heads_go_first() -> None:
    layers = _model(1)
    gu = layers["layers.0.gate_up_proj"].weight
    o = layers["layers.0.o_proj"]
    with torch.no_grad():
        gu[5] = 0.0  # channel 5 never fires: silu(0) * up = 0
        gu[9] = 0.0
        qkv = layers["layers.0.qkv_proj"].weight
        qkv[1 * HD : 2 * HD] = 0.0  # head 1 (group 0) outputs zeros
        qkv[2 * HD : 3 * HD] = 0.0  # head 2 (group 1)
    s = StructuredSparsifier(
        StructuredConfig(
            ffn_sparsity=2 / FFN,
            head_sparsity=0.5,
            channel_multiple=1,
            min_ffn_fraction=0.0,
            calibration_tokens=256,
            calibration_seq_len=128,
        ),
        tokenize=tokenize_bytes,
        head_dim=HD,
    )
    x = activations(H, 16, seed=3)
    ref = block_forward(layers, 0, x, HEADS).detach().clone()
    s.prepare(layers, _run(layers, 1))
    shapes = s.apply(layers)
    assert shapes == {0: BlockShape(intermediate_size=FFN - 2, num_heads=2, num_kv_heads=KV)}
    assert layers["layers.0.gate_up_proj"].output_sizes == (FFN - 2, FFN - 2)
    assert layers["layers.0.qkv_proj"].output_sizes == (2 * HD, KV * HD, KV * HD)
    assert o.input_size == 2 * HD
    # nothing that mattered was removed: the block computes what it did
    assert torch.allclose(block_forward(layers, 0, x, 2), ref, atol=1e-4)


def test_global_allocation_gives_blocks_different_widths() -> None:
    layers = _model(2)
    cfg = dict(
        ffn_sparsity=0.5, channel_multiple=4, calibration_tokens=512, calibration_seq_len=128
    )
    with torch.no_grad():
        # half of block 1's channels barely reach the output: block 1 should lose more
        layers["layers.1.down_proj"].weight[:, ::2] *= 0.01
    s = StructuredSparsifier(StructuredConfig(**cfg), tokenize=tokenize_bytes, head_dim=HD)
    s.prepare(layers, _run(layers))
    shapes = s.apply(layers)
    widths = {i: shape.intermediate_size for i, shape in shapes.items()}
    assert widths == {0: 20, 1: 12}
    uniform = _model(2)
    with torch.no_grad():
        uniform["layers.1.down_proj"].weight[:, ::2] *= 0.01
    u = StructuredSparsifier(
        StructuredConfig(allocation="uniform", **cfg), tokenize=tokenize_bytes, head_dim=HD
    )
    u.prepare(uniform, _run(uniform))
    assert {i: b.intermediate_size for i, b in u.apply(uniform).items()} == {0: 16, 1: 16}


def test_every_block_keeps_a_floor_and_a_head_per_group() -> None:
    layers = _model(2)
    s = StructuredSparsifier(
        StructuredConfig(
            ffn_sparsity=0.9,
            head_sparsity=0.9,
            channel_multiple=8,
            min_ffn_fraction=0.25,
            calibration_tokens=256,
            calibration_seq_len=128,
        ),
        tokenize=tokenize_bytes,
        head_dim=HD,
    )
    s.prepare(layers, _run(layers))
    for shape in s.apply(layers).values():
        assert shape.intermediate_size >= 8 and shape.num_heads == KV


def test_head_pruning_needs_head_dim() -> None:
    layers = _model(1)
    s = StructuredSparsifier(StructuredConfig(head_sparsity=0.5), tokenize=tokenize_bytes)
    with pytest.raises(ValueError) as info:
        s.prepare(layers, _run(layers, 1))
    assert str(info.value) == (
        "structured head pruning needs the model's head size: build the sparsifier with "
        "head_dim=<int>"
    )


def test_incomplete_blocks_and_wrong_stacks_are_errors() -> None:
    layers = _model(1)
    del layers["layers.0.o_proj"]
    with pytest.raises(ValueError) as info:
        StructuredSparsifier(tokenize=tokenize_bytes).prepare(layers, _run(layers, 1))
    assert str(info.value) == (
        "structured pruning needs every projection of block 0; layers.0.o_proj is missing"
    )
    layers = _model(1)
    layers["layers.0.gate_up_proj"] = make_linear(2 * FFN, H, output_sizes=(2 * FFN,))
    with pytest.raises(ValueError, match=r"must stack gate and up \(two equal output_sizes\)"):
        StructuredSparsifier(tokenize=tokenize_bytes).prepare(layers, _run(layers, 1))
    with pytest.raises(ValueError, match=r"call prepare\(layers, run\) before apply"):
        StructuredSparsifier(tokenize=tokenize_bytes).apply(_model(1))


def test_changed_layers_drop_their_packed_blocks_and_keep_dtype() -> None:
    layers = {k: v.to(torch.bfloat16) for k, v in _model(1).items()}
    for layer in layers.values():
        layer.packed = "blocks"
    s = StructuredSparsifier(
        StructuredConfig(ffn_sparsity=0.5, channel_multiple=8, calibration_tokens=128),
        tokenize=tokenize_bytes,
    )

    def run(ids: list[int]) -> None:
        block_forward(layers, 0, activations(H, len(ids), seed=1, dtype="bfloat16"), HEADS)

    s.prepare(layers, run)
    assert s.apply(layers) == {0: BlockShape(16, 0, 0)}
    assert layers["layers.0.down_proj"].packed is None
    assert layers["layers.0.gate_up_proj"].packed is None
    assert layers["layers.0.qkv_proj"].packed == "blocks"  # untouched
    assert layers["layers.0.down_proj"].weight.dtype == torch.bfloat16
    assert layers["layers.0.down_proj"].bias.dtype == torch.bfloat16
