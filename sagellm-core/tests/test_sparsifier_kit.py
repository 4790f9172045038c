"""The sparsifier suite passes reference sparsifiers and fails broken variants of them.

Needs torch (the suite's layers are torch modules): skipped without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from sagellm.core.testing import SparsifierConformance
from sagellm.core.types import BlockShape, SparsityProfile

torch = pytest.importorskip("torch")


class PlainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HalfMagnitude:
    """Reference masking sparsifier: the smaller half of |w| of each row of every block
    projection is zeroed."""

    config_class: ClassVar[type[BaseModel]] = PlainConfig
    sparsity = 0.5

    def __init__(self, **_context: Any) -> None:
        self.config = PlainConfig()

    def profile(self) -> SparsityProfile:
        return SparsityProfile(method="magnitude", sparsity=0.5)

    def prepare(
        self,
        layers: Mapping[str, torch.nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        pass

    def targets(self, layers: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        return {n: layer for n, layer in layers.items() if n.startswith("layers.")}

    def apply(self, layers: Mapping[str, torch.nn.Module]) -> dict[int, BlockShape]:
        for layer in self.targets(layers).values():
            w = layer.weight
            k = int(w.shape[1] * self.sparsity)
            idx = torch.argsort(w.abs(), dim=1, stable=True)[:, :k]
            with torch.no_grad():
                w.scatter_(1, idx, 0.0)
            layer.packed = None
        return {}

    def linear_method(self, name: str, layer: torch.nn.Module) -> Any:
        return None


class DropHalfTheFFN(HalfMagnitude):
    """Reference structured sparsifier: the second half of every block's FFN channels go."""

    def profile(self) -> SparsityProfile:
        return SparsityProfile(method="structured", pattern="structured", sparsity=0.5)

    def apply(self, layers: Mapping[str, torch.nn.Module]) -> dict[int, BlockShape]:
        shapes = {}
        for name, gate_up in layers.items():
            if not name.endswith("gate_up_proj"):
                continue
            index = int(name.split(".")[1])
            down = layers[f"layers.{index}.down_proj"]
            i = gate_up.output_sizes[0]
            k = i // 2
            rows = torch.cat([torch.arange(k), torch.arange(i, i + k)])
            gate_up.weight = torch.nn.Parameter(gate_up.weight[rows].clone(), requires_grad=False)
            gate_up.output_sizes, gate_up.output_size = (k, k), 2 * k
            down.weight = torch.nn.Parameter(down.weight[:, :k].clone(), requires_grad=False)
            down.input_size = k
            gate_up.packed = down.packed = None
            qkv = layers[f"layers.{index}.qkv_proj"]
            shapes[index] = BlockShape(k, qkv.output_sizes[0] // 8, qkv.output_sizes[1] // 8)
        return shapes


class PrunesTooLittle(HalfMagnitude):
    sparsity = 0.25


class PrunesTheHead(HalfMagnitude):
    def targets(self, layers: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        return dict(layers)


class KeepsPacked(HalfMagnitude):
    def apply(self, layers: Mapping[str, torch.nn.Module]) -> dict[int, BlockShape]:
        out = super().apply(layers)
        for layer in layers.values():
            layer.packed = object()
        return out


class Random(HalfMagnitude):
    def apply(self, layers: Mapping[str, torch.nn.Module]) -> dict[int, BlockShape]:
        for layer in self.targets(layers).values():
            with torch.no_grad():
                layer.weight[torch.rand(layer.weight.shape) < 0.6] = 0.0
            layer.packed = None
        return {}


class Destroys(HalfMagnitude):
    sparsity = 0.95

    def profile(self) -> SparsityProfile:
        return SparsityProfile(method="magnitude", sparsity=0.95)


class NotNM(HalfMagnitude):
    def profile(self) -> SparsityProfile:
        return SparsityProfile(method="magnitude", pattern="n:m", sparsity=0.5, n=2, m=4)


class WrongShapes(DropHalfTheFFN):
    def apply(self, layers: Mapping[str, torch.nn.Module]) -> dict[int, BlockShape]:
        shapes = super().apply(layers)
        return {
            i: BlockShape(s.intermediate_size + 1, s.num_heads, s.num_kv_heads)
            for i, s in shapes.items()
        }


class NoShapes(DropHalfTheFFN):
    def apply(self, layers: Mapping[str, torch.nn.Module]) -> dict[int, BlockShape]:
        super().apply(layers)
        return {}


class IgnoresMissingRun(HalfMagnitude):
    """Claims to calibrate but accepts run=None."""


class NoProfile(HalfMagnitude):
    profile = None  # type: ignore[assignment]


def _suite(sparsifier: type, **attrs: Any) -> type:
    body = {"make_sparsifier": lambda self: sparsifier(), "calibrates": False, **attrs}
    return type("Suite", (SparsifierConformance,), body)


@pytest.mark.parametrize("sparsifier", [HalfMagnitude, DropHalfTheFFN], ids=lambda v: v.__name__)
def test_reference_sparsifiers_pass(sparsifier: type) -> None:
    suite = _suite(sparsifier)()
    for name in dir(suite):
        if name.startswith("test_"):
            getattr(suite, name)()


@pytest.mark.parametrize(
    ("sparsifier", "method", "attrs"),
    [
        (PrunesTooLittle, "test_pruned_layers_follow_the_profile", {}),
        (PrunesTheHead, "test_pruned_layers_follow_the_profile", {}),
        (KeepsPacked, "test_pruned_layers_follow_the_profile", {}),
        (NotNM, "test_pruned_layers_follow_the_profile", {}),
        (WrongShapes, "test_pruned_layers_follow_the_profile", {}),
        (NoShapes, "test_pruned_layers_follow_the_profile", {}),
        (Destroys, "test_blocks_stay_close_to_dense", {"rtol": 0.6}),
        (Random, "test_pruning_is_deterministic", {}),
        (IgnoresMissingRun, "test_prepare_without_run", {"calibrates": True}),
        (NoProfile, "test_profile_is_a_sparsity_profile", {}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_sparsifier_suite_catches(sparsifier: type, method: str, attrs: dict[str, Any]) -> None:
    suite = _suite(sparsifier, **attrs)
    with pytest.raises((AssertionError, TypeError, pytest.fail.Exception)):
        getattr(suite(), method)()


def test_unimplemented_factory_says_what_to_write() -> None:
    with pytest.raises(NotImplementedError, match=r"must implement make_sparsifier\(\)"):
        SparsifierConformance().test_is_a_sparsifier()
