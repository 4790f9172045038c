"""Conformance suite of :class:`sagellm.core.protocols.Sparsifier`.

The suite needs torch (every test imports it through ``pytest.importorskip``), but this
module imports it only inside functions, so ``sagellm.core.testing`` stays importable
without it. The layers are small modules with the attributes of the engine's ``Linear``
(:func:`sagellm.core.testing.quantizer.make_linear`), arranged as the projections of
decoder blocks (q/k/v stacked, gate/up stacked) plus a head.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from sagellm.core.protocols import LinearMethod, Sparsifier
from sagellm.core.testing.quantizer import activations, make_linear
from sagellm.core.types import BlockShape, SparsityProfile

__all__ = ["SparsifierConformance", "block_forward", "tokenize_bytes"]


def tokenize_bytes(text: str) -> list[int]:
    """A tokenizer for tests: the UTF-8 bytes of ``text``."""
    return list(text.encode("utf-8"))


def block_forward(layers: dict[str, Any], index: int, x: Any, num_heads: int) -> Any:
    """A stand-in for decoder block ``index`` that calls its four projections in order.

    Attention is replaced by the q part of ``qkv_proj`` (so ``o_proj`` sees one
    ``head_dim`` slice per query head, as after attention), the MLP is SwiGLU. Returns
    ``o_proj(q) + down(silu(gate) * up)``.
    """
    import torch
    from torch.nn import functional as F

    p = f"layers.{index}."
    qkv = layers[p + "qkv_proj"]
    q_size = int(qkv.output_sizes[0])
    q = qkv(x)[:, :q_size]
    attn = layers[p + "o_proj"](q)
    gate_up = layers[p + "gate_up_proj"](x)
    inter = int(layers[p + "gate_up_proj"].output_sizes[0])
    mlp = layers[p + "down_proj"](F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
    out: torch.Tensor = attn + mlp
    return out


class SparsifierConformance:
    """Behaviour every sparsifier shares. Subclass it and implement :meth:`make_sparsifier`.

    ``make_sparsifier()`` returns a fresh sparsifier built with ``tokenize=`` (use
    :func:`tokenize_bytes`) and ``head_dim=`` :attr:`head_dim`. The suite prepares it on
    :meth:`make_layers` (``num_blocks`` decoder blocks plus a head) with
    :meth:`calibration_run`, which feeds each block :func:`activations` seeded by the
    token ids through :func:`block_forward`, applies it, and checks:

    * masking sparsifiers keep every shape, return ``{}``, zero at least the fraction of
      weights their profile states in each pruned projection (``n:m`` ones: the pattern
      holds in every row), leave the head untouched;
    * structured ones return a :class:`BlockShape` per changed block that matches the
      layers' new weights and sizes, keep the KV heads, and shrink the blocks;
    * each pruned block's output on fresh inputs stays within ``rtol`` of the dense
      block's (relative Frobenius norm), and pruning is deterministic;
    * changed layers drop their ``packed`` checkpoint blocks; any linear method returned
      computes the pruned layer's product.
    """

    #: Largest relative output error of a pruned block (see the class docstring).
    rtol: ClassVar[float] = 0.9
    #: Compute dtype of the layers and inputs.
    dtype: ClassVar[str] = "float32"
    #: Whether prepare() needs ``run`` (then prepare(layers, None) must raise ValueError).
    calibrates: ClassVar[bool] = True
    #: Shape of the blocks: hidden size, query heads, KV heads, head size, FFN width.
    hidden_size: ClassVar[int] = 64
    num_heads: ClassVar[int] = 8
    num_kv_heads: ClassVar[int] = 2
    head_dim: ClassVar[int] = 8
    intermediate_size: ClassVar[int] = 128
    num_blocks: ClassVar[int] = 2

    def make_sparsifier(self) -> Any:
        """A fresh sparsifier (override this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_sparsifier()")

    def make_layers(self) -> dict[str, Any]:
        """Fresh projections by name: ``num_blocks`` blocks and a head."""
        d, h, i = self.dtype, self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layers: dict[str, Any] = {}
        for b in range(self.num_blocks):
            s = 10 * b
            p = f"layers.{b}."
            layers[p + "qkv_proj"] = make_linear(
                q + 2 * kv, h, seed=s + 1, dtype=d, output_sizes=(q, kv, kv)
            )
            layers[p + "o_proj"] = make_linear(h, q, seed=s + 2, dtype=d)
            layers[p + "gate_up_proj"] = make_linear(
                2 * i, h, seed=s + 3, dtype=d, output_sizes=(i, i)
            )
            layers[p + "down_proj"] = make_linear(h, i, seed=s + 4, dtype=d)
        layers["lm_head"] = make_linear(96, h, seed=99, dtype=d)
        return layers

    def calibration_run(self, layers: dict[str, Any]) -> Callable[[Sequence[int]], object]:
        """``run(token_ids)``: every block and the head on activations seeded by the ids."""

        def run(token_ids: Sequence[int]) -> None:
            ids = [int(t) for t in token_ids]
            seed = zlib.crc32(repr(ids).encode())
            x = activations(self.hidden_size, len(ids), seed, self.dtype)
            for b in range(self.num_blocks):
                block_forward(layers, b, x, self.num_heads)
            layers["lm_head"](x)

        return run

    def _pruned(self) -> tuple[Any, dict[str, Any], dict[str, Any], dict[int, Any]]:
        import torch

        layers = self.make_layers()
        dense = self.make_layers()
        sparsifier = self.make_sparsifier()
        for layer in layers.values():
            layer.packed = object()  # stands for checkpoint blocks
        sparsifier.prepare(layers, self.calibration_run(layers))
        shapes = sparsifier.apply(layers)
        assert isinstance(shapes, dict), f"apply() returned {type(shapes).__name__}, not a dict"
        for layer in layers.values():
            assert isinstance(layer.weight, torch.Tensor)
        return sparsifier, layers, dense, shapes

    # ------------------------------------------------------------------ tests

    def test_is_a_sparsifier(self) -> None:
        sparsifier = self.make_sparsifier()
        assert isinstance(sparsifier, Sparsifier), (
            f"{type(sparsifier).__name__} is not a Sparsifier"
        )
        config_class = type(sparsifier).config_class
        assert isinstance(config_class, type) and issubclass(config_class, BaseModel)

    def test_profile_is_a_sparsity_profile(self) -> None:
        profile = self.make_sparsifier().profile()
        assert isinstance(profile, SparsityProfile), f"profile() returned {profile!r}"
        assert profile.calibrated == self.calibrates

    def test_prepare_without_run(self) -> None:
        pytest.importorskip("torch")
        layers = self.make_layers()
        sparsifier = self.make_sparsifier()
        if self.calibrates:
            with pytest.raises(ValueError) as info:
                sparsifier.prepare(layers, None)
            assert str(info.value).strip(), "the ValueError of a missing run says nothing"
        else:
            sparsifier.prepare(layers, None)
            sparsifier.apply(layers)

    def test_pruned_layers_follow_the_profile(self) -> None:
        torch = pytest.importorskip("torch")
        sparsifier, layers, dense, shapes = self._pruned()
        profile = sparsifier.profile()
        head, dense_head = layers["lm_head"], dense["lm_head"]
        assert torch.equal(head.weight, dense_head.weight), "the head was pruned"
        changed = [n for n in layers if not _same(layers[n], dense[n])]
        assert changed, "the sparsifier changed no layer"
        for name in changed:
            assert layers[name].packed is None, f"{name}: changed but still has packed blocks"
        if profile.pattern == "structured":
            self._check_structured(layers, dense, shapes)
            return
        assert shapes == {}, f"a masking sparsifier returned shapes {shapes}"
        for name in changed:
            w, d = layers[name].weight, dense[name].weight
            assert tuple(w.shape) == tuple(d.shape), f"{name}: shape changed by a mask"
            zeros = float((w == 0).double().mean())
            assert zeros >= profile.sparsity - 1.0 / w.shape[1], (
                f"{name}: {zeros:.3f} of the weights are zero, below the profile's "
                f"{profile.sparsity:.3f}"
            )
            if profile.pattern == "n:m":
                assert profile.n is not None and profile.m is not None
                rows, cols = w.shape
                nz = (w != 0).reshape(rows, cols // profile.m, profile.m).sum(dim=-1)
                assert int(nz.max()) <= profile.n, (
                    f"{name}: a group of {profile.m} has {int(nz.max())} non-zeros, more "
                    f"than {profile.n}"
                )

    def _check_structured(
        self, layers: dict[str, Any], dense: dict[str, Any], shapes: dict[int, Any]
    ) -> None:
        assert shapes, "a structured sparsifier that changed layers returned no shapes"
        for index, shape in shapes.items():
            assert isinstance(shape, BlockShape), f"block {index}: {shape!r} is not a BlockShape"
            p = f"layers.{index}."
            qkv, o = layers[p + "qkv_proj"], layers[p + "o_proj"]
            gate_up, down = layers[p + "gate_up_proj"], layers[p + "down_proj"]
            q, kv = shape.num_heads * self.head_dim, shape.num_kv_heads * self.head_dim
            assert shape.num_kv_heads == self.num_kv_heads, f"block {index}: KV heads changed"
            assert shape.num_heads % shape.num_kv_heads == 0, f"block {index}: {shape}"
            assert tuple(qkv.output_sizes) == (q, kv, kv), f"block {index}: {qkv.output_sizes}"
            assert tuple(qkv.weight.shape) == (q + 2 * kv, self.hidden_size)
            assert o.input_size == q and tuple(o.weight.shape) == (self.hidden_size, q)
            i = shape.intermediate_size
            assert tuple(gate_up.output_sizes) == (i, i), f"block {index}: {gate_up.output_sizes}"
            assert tuple(gate_up.weight.shape) == (2 * i, self.hidden_size)
            assert gate_up.output_size == 2 * i
            assert down.input_size == i and tuple(down.weight.shape) == (self.hidden_size, i)
            assert (i, shape.num_heads) != (self.intermediate_size, self.num_heads), (
                f"block {index} is reported changed with its dense shape"
            )
        for index in range(self.num_blocks):
            if index not in shapes:
                p = f"layers.{index}."
                for kind in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                    got = tuple(layers[p + kind].weight.shape)
                    want = tuple(dense[p + kind].weight.shape)
                    assert got == want, f"{p}{kind} changed shape but block {index} has no shape"

    def test_blocks_stay_close_to_dense(self) -> None:
        torch = pytest.importorskip("torch")
        _sparsifier, layers, dense, _shapes = self._pruned()
        for index in range(self.num_blocks):
            x = activations(self.hidden_size, 32, seed=20_000 + index, dtype=self.dtype)
            before = x.clone()
            y = block_forward(layers, index, x, self.num_heads).float()
            ref = block_forward(dense, index, x, self.num_heads).float()
            assert torch.equal(x, before)
            err = float((y - ref).norm() / ref.norm().clamp_min(1e-12))
            assert err <= self.rtol, (
                f"block {index} is {err:.4f} off the dense block (relative), above the "
                f"suite's rtol {self.rtol}"
            )

    def test_pruning_is_deterministic(self) -> None:
        torch = pytest.importorskip("torch")
        _s1, first, _d1, shapes1 = self._pruned()
        _s2, second, _d2, shapes2 = self._pruned()
        assert shapes1 == shapes2
        for name in first:
            assert torch.equal(first[name].weight, second[name].weight), f"{name} differs"

    def test_linear_methods_compute_the_pruned_product(self) -> None:
        torch = pytest.importorskip("torch")
        sparsifier, layers, _dense, _shapes = self._pruned()
        for name, layer in layers.items():
            method = sparsifier.linear_method(name, layer)
            if method is None:
                continue
            assert isinstance(method, LinearMethod), f"{name}: {method!r} is not a LinearMethod"
            w = layer.weight.detach().float().clone()
            bias = None if layer.bias is None else layer.bias.detach().float().clone()
            method.process_weights(layer)
            x = activations(w.shape[1], 4, seed=30_000, dtype=self.dtype).to(w.device)
            y = method.apply(layer, x).float()
            ref = torch.nn.functional.linear(x.float(), w, bias)
            err = float((y - ref).norm() / ref.norm().clamp_min(1e-12))
            assert err <= 0.02, f"{name}: {method.name} is {err:.4f} off the pruned product"


def _same(a: Any, b: Any) -> bool:
    import torch

    return bool(tuple(a.weight.shape) == tuple(b.weight.shape) and torch.equal(a.weight, b.weight))
