"""Every quantizer of the package passes core's Quantizer conformance suite."""

from __future__ import annotations

from typing import Any

import torch
from blocks import random_packed

from sagellm.core.testing import QuantizerConformance
from sagellm.core.testing.quantizer import make_linear
from sagellm.quantization.awq import AWQQuantizer
from sagellm.quantization.config import (
    AWQConfig,
    GGUFConfig,
    GPTQConfig,
    Int4Config,
    Int8Config,
    SmoothQuantConfig,
)
from sagellm.quantization.formats import decode_blocks
from sagellm.quantization.gguf import GGUFQuantizer
from sagellm.quantization.gptq import GPTQQuantizer
from sagellm.quantization.rtn import Int4Quantizer, Int8Quantizer
from sagellm.quantization.smoothquant import SmoothQuantQuantizer


def _tokenize(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class TestInt8(QuantizerConformance):
    rtol = 0.02

    def make_quantizer(self) -> Int8Quantizer:
        return Int8Quantizer(Int8Config(dense_min_rows=None))


class TestInt8Bf16WithDenseFallback(QuantizerConformance):
    rtol = 0.03
    dtype = "bfloat16"

    def make_quantizer(self) -> Int8Quantizer:
        return Int8Quantizer(Int8Config())


class TestInt4(QuantizerConformance):
    rtol = 0.12

    def make_quantizer(self) -> Int4Quantizer:
        return Int4Quantizer(Int4Config(dense_min_rows=None))


class TestInt4Bf16Group128(QuantizerConformance):
    rtol = 0.15
    dtype = "bfloat16"

    def make_quantizer(self) -> Int4Quantizer:
        return Int4Quantizer(Int4Config(group_size=128, dense_min_rows=None))


class TestGPTQ(QuantizerConformance):
    rtol = 0.12
    calibrates = True

    def make_quantizer(self) -> GPTQQuantizer:
        cfg = GPTQConfig(group_size=64, dense_min_rows=None, calibration_tokens=512)
        return GPTQQuantizer(cfg, tokenize=_tokenize)


class TestGPTQActOrderBf16(QuantizerConformance):
    rtol = 0.15
    dtype = "bfloat16"
    calibrates = True

    def make_quantizer(self) -> GPTQQuantizer:
        cfg = GPTQConfig(group_size=32, act_order=True, dense_min_rows=None, calibration_tokens=512)
        return GPTQQuantizer(cfg, tokenize=_tokenize)


class TestAWQ(QuantizerConformance):
    rtol = 0.12
    calibrates = True

    def make_quantizer(self) -> AWQQuantizer:
        cfg = AWQConfig(group_size=64, dense_min_rows=None, calibration_tokens=512)
        return AWQQuantizer(cfg, tokenize=_tokenize)


class TestAWQBf16(QuantizerConformance):
    rtol = 0.15
    dtype = "bfloat16"
    calibrates = True

    def make_quantizer(self) -> AWQQuantizer:
        cfg = AWQConfig(group_size=32, dense_min_rows=None, calibration_tokens=512)
        return AWQQuantizer(cfg, tokenize=_tokenize)


class TestSmoothQuant(QuantizerConformance):
    rtol = 0.03
    calibrates = True

    def make_quantizer(self) -> SmoothQuantQuantizer:
        cfg = SmoothQuantConfig(calibration_tokens=512, w8a8_min_rows=4)
        return SmoothQuantQuantizer(cfg, tokenize=_tokenize)


class TestSmoothQuantBf16(QuantizerConformance):
    rtol = 0.04
    dtype = "bfloat16"
    calibrates = True

    def make_quantizer(self) -> SmoothQuantQuantizer:
        return SmoothQuantQuantizer(SmoothQuantConfig(calibration_tokens=512), tokenize=_tokenize)


def _gguf_layer(fmt: str, rows: int, cols: int, seed: int, dtype: str) -> Any:
    packed = random_packed(fmt, rows, cols, seed=seed)
    w = decode_blocks(fmt, packed.data, packed.shape)
    return make_linear(rows, cols, weight=w, packed=packed, dtype=dtype)


class TestGGUF(QuantizerConformance):
    """Q4_1 / Q4_0 projections and a Q8_0 head: the blocks' own values."""

    rtol = 1e-5  # exact formats: float32 rounding only

    def make_quantizer(self) -> GGUFQuantizer:
        return GGUFQuantizer(GGUFConfig(dense_min_rows=None))

    def make_layers(self) -> dict[str, Any]:
        d = self.dtype
        return {
            "layers.0.qkv_proj": _gguf_layer("q4_1", 192, 128, 1, d),
            "layers.0.o_proj": _gguf_layer("q4_0", 128, 128, 2, d),
            "layers.0.down_proj": _gguf_layer("q4_1", 128, 256, 3, d),
            "lm_head": _gguf_layer("q8_0", 320, 128, 4, d),
        }

    def make_unfit_layers(self) -> dict[str, Any]:
        return {"layers.0.o_proj": _gguf_layer("q4_1", 24, 64, 5, self.dtype)}


class TestGGUFBf16(TestGGUF):
    rtol = 0.01
    dtype = "bfloat16"


def test_gguf_layers_are_decoded_blocks() -> None:
    layer = TestGGUF().make_layers()["layers.0.qkv_proj"]
    packed = layer.packed
    assert torch.equal(layer.weight, decode_blocks("q4_1", packed.data, packed.shape))
