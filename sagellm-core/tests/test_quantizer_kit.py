"""The quantizer suite passes a reference quantizer and fails broken variants of it.

Needs torch (the suite's layers are torch modules): skipped without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from sagellm.core.testing import QuantizerConformance
from sagellm.core.types import QuantizationProfile

torch = pytest.importorskip("torch")


class RoundingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RoundingMethod:
    """Per-row symmetric int8 fake quantization: the float product of the rounded weight."""

    name = "rounded_int8"

    def process_weights(self, layer: torch.nn.Module) -> None:
        w = layer.weight.detach().float()
        if w.shape[1] % 16 or w.shape[0] % 16:
            raise ValueError(f"rows and columns must be multiples of 16, got {list(w.shape)}")
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        layer.register_buffer("rounded", ((w / scale).round() * scale).to(layer.weight.dtype))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, layer.rounded, layer.bias)


class RoundingQuantizer:
    """A reference quantizer: every projection through :class:`RoundingMethod`."""

    config_class: ClassVar[type[BaseModel]] = RoundingConfig

    def __init__(self, config: RoundingConfig | None = None) -> None:
        self.config = config or RoundingConfig()

    def profile(self) -> QuantizationProfile:
        return QuantizationProfile(method="int8", weight_bits=8)

    def prepare(
        self,
        layers: Mapping[str, torch.nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        pass

    def linear_method(self, name: str, layer: torch.nn.Module) -> Any:
        return self.method_class()

    method_class: ClassVar[type] = RoundingMethod


class CalibratedRounding(RoundingQuantizer):
    """Needs ``run``: counts the rows each layer sees through pre-hooks."""

    def prepare(
        self,
        layers: Mapping[str, torch.nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        if run is None:
            raise ValueError("calibration needs run(token_ids)")
        rows: dict[str, int] = {}
        hooks = [
            layer.register_forward_pre_hook(
                lambda _m, args, n=name: rows.__setitem__(n, rows.get(n, 0) + args[0].shape[0])
            )
            for name, layer in layers.items()
        ]
        run([1, 2, 3, 4])
        for h in hooks:
            h.remove()
        assert set(rows) == set(layers)


class TestRoundingQuantizer(QuantizerConformance):
    rtol = 0.02

    def make_quantizer(self) -> RoundingQuantizer:
        return RoundingQuantizer()


class TestCalibratedRounding(QuantizerConformance):
    rtol = 0.02
    calibrates = True

    def make_quantizer(self) -> CalibratedRounding:
        return CalibratedRounding()


class TestRoundingQuantizerBf16(QuantizerConformance):
    rtol = 0.03
    dtype = "bfloat16"

    def make_quantizer(self) -> RoundingQuantizer:
        return RoundingQuantizer()


# --------------------------------------------------------------------------- broken variants


class ScaledOutput(RoundingMethod):
    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return super().apply(layer, x) * 1.5


class ChangesInput(RoundingMethod):
    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = super().apply(layer, x)
        x.mul_(0.5)
        return y


class Unnamed(RoundingMethod):
    name = ""


class WrongDtype(RoundingMethod):
    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return super().apply(layer, x).double()


class DropsARow(RoundingMethod):
    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return super().apply(layer, x)[1:]


class Noisy(RoundingMethod):
    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = super().apply(layer, x)
        return y + 1e-3 * torch.randn_like(y) * y.abs().mean()


class NoProcessWeights:
    name = "incomplete"

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, layer.weight, layer.bias)


class AcceptsAnyShape(RoundingMethod):
    def process_weights(self, layer: torch.nn.Module) -> None:
        layer.register_buffer("rounded", layer.weight.detach().clone())


class SilentError(RoundingMethod):
    def process_weights(self, layer: torch.nn.Module) -> None:
        if layer.weight.shape[1] % 16:
            raise ValueError("")
        super().process_weights(layer)


def _with_method(method: type) -> type[RoundingQuantizer]:
    return type(f"With{method.__name__}", (RoundingQuantizer,), {"method_class": method})


class NoProfile(RoundingQuantizer):
    def profile(self) -> Any:
        return {"method": "int8"}


class NoLinearMethod:
    config_class: ClassVar[type[BaseModel]] = RoundingConfig

    def profile(self) -> QuantizationProfile:
        return QuantizationProfile()

    def prepare(self, layers: Any, run: Any = None) -> None:
        pass


class IgnoresMissingRun(CalibratedRounding):
    def prepare(
        self,
        layers: Mapping[str, torch.nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        if run is not None:
            super().prepare(layers, run)


class KeepsEverythingFloat(RoundingQuantizer):
    def linear_method(self, name: str, layer: torch.nn.Module) -> Any:
        return None


def _suite(quantizer: type, *, calibrates: bool = False) -> type:
    return type(
        "Suite",
        (QuantizerConformance,),
        {"make_quantizer": lambda self: quantizer(), "rtol": 0.02, "calibrates": calibrates},
    )


@pytest.mark.parametrize(
    ("quantizer", "method", "calibrates"),
    [
        (_with_method(ScaledOutput), "test_methods_follow_the_float_layers", False),
        (_with_method(ChangesInput), "test_methods_follow_the_float_layers", False),
        (_with_method(Unnamed), "test_methods_follow_the_float_layers", False),
        (_with_method(WrongDtype), "test_methods_follow_the_float_layers", False),
        (_with_method(DropsARow), "test_methods_follow_the_float_layers", False),
        (_with_method(Noisy), "test_methods_follow_the_float_layers", False),
        (_with_method(NoProcessWeights), "test_methods_follow_the_float_layers", False),
        (KeepsEverythingFloat, "test_methods_follow_the_float_layers", False),
        (_with_method(AcceptsAnyShape), "test_unfit_shapes_raise_value_error", False),
        (_with_method(SilentError), "test_unfit_shapes_raise_value_error", False),
        (NoProfile, "test_profile_is_a_quantization_profile", False),
        (NoLinearMethod, "test_is_a_quantizer", False),
        (IgnoresMissingRun, "test_prepare_without_run", True),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_quantizer_suite_catches(quantizer: type, method: str, calibrates: bool) -> None:
    suite = _suite(quantizer, calibrates=calibrates)
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        getattr(suite(), method)()


def test_unimplemented_factory_says_what_to_write() -> None:
    with pytest.raises(NotImplementedError, match=r"must implement make_quantizer\(\)"):
        QuantizerConformance().test_is_a_quantizer()
