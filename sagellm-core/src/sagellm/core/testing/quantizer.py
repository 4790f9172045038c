"""Conformance suite of :class:`sagellm.core.protocols.Quantizer` and its linear methods.

The suite needs torch (every test imports it through ``pytest.importorskip``), but this
module imports it only inside functions, so ``sagellm.core.testing`` stays importable
without it.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from sagellm.core.protocols import LinearMethod, Quantizer
from sagellm.core.types import QuantizationProfile

__all__ = ["QuantizerConformance", "activations", "make_linear"]


@functools.cache
def _linear_class() -> type:
    from torch import nn
    from torch.nn import functional as F

    class TinyLinear(nn.Module):
        """A projection with the attributes of the engine's ``Linear``: ``input_size``,
        ``output_size``, ``output_sizes``, ``weight`` ``[out, in]``, ``bias``, ``packed``;
        ``forward`` is the float product (what calibration hooks see)."""

        def __init__(
            self,
            weight: Any,
            bias: Any = None,
            output_sizes: Sequence[int] | None = None,
            packed: Any = None,
        ) -> None:
            super().__init__()
            self.output_size, self.input_size = (int(d) for d in weight.shape)
            self.output_sizes = tuple(output_sizes or (self.output_size,))
            self.weight: Any = nn.Parameter(weight, requires_grad=False)
            self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            self.packed = packed

        def forward(self, x: Any) -> Any:
            return F.linear(x, self.weight, self.bias)

    return TinyLinear


def make_linear(
    output_size: int,
    input_size: int,
    *,
    bias: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    weight: Any = None,
    packed: Any = None,
    output_sizes: Sequence[int] | None = None,
) -> Any:
    """A small projection module like the engine's ``Linear`` (torch needed).

    The weight is ``weight`` (cast to ``dtype``) or seeded Gaussian with a std of
    ``input_size ** -0.5``; ``packed`` is put on the layer as its checkpoint blocks.
    """
    import torch

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    if weight is None:
        weight = torch.randn(output_size, input_size, generator=gen) * input_size**-0.5
    b = torch.randn(output_size, generator=gen) * 0.1 if bias else None
    return _linear_class()(
        weight.to(dt),
        None if b is None else b.to(dt),
        output_sizes=output_sizes,
        packed=packed,
    )


@functools.cache
def _mixing(input_size: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(7919 + input_size)
    # strongly correlated channels (a random mixing on top of a small diagonal), so that
    # methods using the inputs' covariance (GPTQ) have something to use
    mix = 0.3 * torch.eye(input_size) + torch.randn(input_size, input_size, generator=gen) * (
        input_size**-0.5
    )
    scale = torch.ones(input_size)
    scale[1 :: max(input_size // 3, 1)] = 8.0  # a few outlier channels, as in LLMs
    return mix * scale


def activations(input_size: int, num_rows: int, seed: int, dtype: str = "float32") -> Any:
    """Seeded inputs ``[num_rows, input_size]`` like a transformer's: correlated channels,
    a few of them about 8x larger than the rest."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, input_size, generator=gen) @ _mixing(input_size)
    return x.to(getattr(torch, dtype))


class QuantizerConformance:
    """Behaviour every quantizer shares. Subclass it and implement :meth:`make_quantizer`.

    ``make_quantizer()`` returns a fresh quantizer with any context it needs (a
    calibrating one: a ``tokenize`` callable). The suite prepares it on
    :meth:`make_layers` (small modules with the engine ``Linear``'s attributes, see
    :func:`make_linear`) with :meth:`calibration_run`, which feeds each layer
    :func:`activations` derived from the token ids, then checks each method it returns
    against the float layer on inputs of the same kind.

    The stated tolerance: for every method and every row count of ``batch_sizes``,
    ``||y_q - y|| / ||y|| <= rtol`` (Frobenius norms over the batch, ``y`` the float32
    product of the original weight). Override the class attributes to tighten it.
    """

    #: Largest relative output error of a quantized projection (see the class docstring).
    rtol: ClassVar[float] = 0.15
    #: Row counts at which each method is checked.
    batch_sizes: ClassVar[tuple[int, ...]] = (1, 4, 32)
    #: Compute dtype of the layers and inputs ("float32", "bfloat16").
    dtype: ClassVar[str] = "float32"
    #: Whether prepare() needs ``run`` (then prepare(layers, None) must raise ValueError).
    calibrates: ClassVar[bool] = False

    def make_quantizer(self) -> Any:
        """A fresh quantizer (override this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_quantizer()")

    def make_layers(self) -> dict[str, Any]:
        """Fresh projections by name, shaped like a transformer layer's and its head."""
        d = self.dtype
        return {
            "layers.0.qkv_proj": make_linear(192, 128, seed=1, dtype=d, output_sizes=(128, 32, 32)),
            "layers.0.o_proj": make_linear(128, 128, seed=2, dtype=d),
            "layers.0.gate_up_proj": make_linear(
                512, 128, seed=3, dtype=d, output_sizes=(256, 256)
            ),
            "layers.0.down_proj": make_linear(128, 256, seed=4, dtype=d, bias=True),
            "lm_head": make_linear(320, 128, seed=5, dtype=d),
        }

    def make_unfit_layers(self) -> dict[str, Any]:
        """Projections whose shapes no CPU kernel takes (40 input columns, 24 rows)."""
        return {"layers.0.o_proj": make_linear(24, 40, seed=6, dtype=self.dtype)}

    def calibration_run(self, layers: dict[str, Any]) -> Callable[[Sequence[int]], object]:
        """``run(token_ids)``: every layer's forward on activations seeded by the ids."""

        def run(token_ids: Sequence[int]) -> None:
            ids = [int(t) for t in token_ids]
            seed = zlib.crc32(repr(ids).encode())
            for layer in layers.values():
                layer(activations(int(layer.input_size), len(ids), seed, self.dtype))

        return run

    # ------------------------------------------------------------------ tests

    def test_is_a_quantizer(self) -> None:
        quantizer = self.make_quantizer()
        assert isinstance(quantizer, Quantizer), f"{type(quantizer).__name__} is not a Quantizer"
        config_class = type(quantizer).config_class
        assert isinstance(config_class, type) and issubclass(config_class, BaseModel)

    def test_profile_is_a_quantization_profile(self) -> None:
        profile = self.make_quantizer().profile()
        assert isinstance(profile, QuantizationProfile), f"profile() returned {profile!r}"

    def test_methods_follow_the_float_layers(self) -> None:
        torch = pytest.importorskip("torch")
        layers = self.make_layers()
        originals = {
            name: (
                layer.weight.detach().float().clone(),
                None if layer.bias is None else layer.bias.detach().float().clone(),
            )
            for name, layer in layers.items()
        }
        quantizer = self.make_quantizer()
        quantizer.prepare(layers, self.calibration_run(layers))
        methods = {}
        for name, layer in layers.items():
            method = quantizer.linear_method(name, layer)
            if method is None:
                continue
            assert isinstance(method, LinearMethod), f"{name}: {method!r} is not a LinearMethod"
            assert isinstance(method.name, str) and method.name, f"{name}: empty method name"
            method.process_weights(layer)
            methods[name] = method
        assert methods, "the quantizer gave none of the layers a method"
        for name, method in methods.items():
            layer = layers[name]
            w, b = originals[name]
            for i, m in enumerate(self.batch_sizes):
                x = activations(w.shape[1], m, seed=10_000 + i, dtype=self.dtype)
                before = x.clone()
                y = method.apply(layer, x)
                assert torch.equal(x, before), f"{name}: {method.name}.apply changed its input"
                assert tuple(y.shape) == (m, w.shape[0]), (
                    f"{name}: {method.name} returned {list(y.shape)} for {m} rows, "
                    f"not [{m}, {w.shape[0]}]"
                )
                assert y.dtype == x.dtype, f"{name}: {method.name} returned {y.dtype}"
                ref = torch.nn.functional.linear(x.float(), w, b)
                err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-12))
                assert err <= self.rtol, (
                    f"{name}: {method.name} at {m} rows is {err:.4f} off the float layer "
                    f"(relative), above the suite's rtol {self.rtol}"
                )
                again = method.apply(layer, x)
                assert torch.equal(again, y), f"{name}: {method.name}.apply is not deterministic"

    def test_prepare_without_run(self) -> None:
        pytest.importorskip("torch")
        layers = self.make_layers()
        quantizer = self.make_quantizer()
        if self.calibrates:
            with pytest.raises(ValueError) as info:
                quantizer.prepare(layers, None)
            assert str(info.value).strip(), "the ValueError of a missing run says nothing"
        else:
            quantizer.prepare(layers, None)
            assert any(quantizer.linear_method(n, layer) for n, layer in layers.items())

    def test_unfit_shapes_raise_value_error(self) -> None:
        pytest.importorskip("torch")
        layers = self.make_unfit_layers()
        quantizer = self.make_quantizer()
        with pytest.raises(ValueError) as info:
            quantizer.prepare(layers, self.calibration_run(layers))
            for name, layer in layers.items():
                method = quantizer.linear_method(name, layer)
                if method is not None:
                    method.process_weights(layer)
        assert str(info.value).strip(), "the ValueError of an unfit shape says nothing"
