"""Every sparsifier of the package passes core's Sparsifier conformance suite."""

from __future__ import annotations

from sagellm.core.testing import SparsifierConformance
from sagellm.core.testing.sparsifier import tokenize_bytes
from sagellm.sparsity.config import MagnitudeConfig, SparseGPTConfig, StructuredConfig, WandaConfig
from sagellm.sparsity.pruning import MagnitudeSparsifier, WandaSparsifier
from sagellm.sparsity.sparsegpt import SparseGPTSparsifier
from sagellm.sparsity.structured import StructuredSparsifier

_SMALL = {"calibration_tokens": 512, "calibration_seq_len": 128}


class TestMagnitudeUnstructured(SparsifierConformance):
    calibrates = False
    rtol = 0.5

    def make_sparsifier(self) -> MagnitudeSparsifier:
        return MagnitudeSparsifier(MagnitudeConfig(sparsity=0.5))


class TestMagnitude2of4(SparsifierConformance):
    calibrates = False
    rtol = 0.65

    def make_sparsifier(self) -> MagnitudeSparsifier:
        return MagnitudeSparsifier(MagnitudeConfig(pattern="2:4"))


class TestWandaUnstructured(SparsifierConformance):
    rtol = 0.35

    def make_sparsifier(self) -> WandaSparsifier:
        return WandaSparsifier(WandaConfig(sparsity=0.5, **_SMALL), tokenize=tokenize_bytes)


class TestWanda4of8(SparsifierConformance):
    rtol = 0.42

    def make_sparsifier(self) -> WandaSparsifier:
        return WandaSparsifier(WandaConfig(pattern="4:8", **_SMALL), tokenize=tokenize_bytes)


class TestSparseGPTUnstructured(SparsifierConformance):
    rtol = 0.3

    def make_sparsifier(self) -> SparseGPTSparsifier:
        return SparseGPTSparsifier(SparseGPTConfig(sparsity=0.5, **_SMALL), tokenize=tokenize_bytes)


class TestSparseGPT2of4(SparsifierConformance):
    rtol = 0.37

    def make_sparsifier(self) -> SparseGPTSparsifier:
        return SparseGPTSparsifier(
            SparseGPTConfig(pattern="2:4", **_SMALL), tokenize=tokenize_bytes
        )


class TestStructuredFFNAndHeads(SparsifierConformance):
    rtol = 0.4

    def make_sparsifier(self) -> StructuredSparsifier:
        return StructuredSparsifier(
            StructuredConfig(ffn_sparsity=0.5, head_sparsity=0.25, channel_multiple=16, **_SMALL),
            tokenize=tokenize_bytes,
            head_dim=self.head_dim,
        )


class TestStructuredUniformBias(SparsifierConformance):
    rtol = 0.45

    def make_sparsifier(self) -> StructuredSparsifier:
        return StructuredSparsifier(
            StructuredConfig(
                ffn_sparsity=0.25,
                head_sparsity=0.5,
                allocation="uniform",
                reconstruct="bias",
                channel_multiple=32,
                **_SMALL,
            ),
            tokenize=tokenize_bytes,
            head_dim=self.head_dim,
        )
