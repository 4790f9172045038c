"""Quantizers and kernel providers as the runtime applies them, on a tiny float model."""

from __future__ import annotations

import pytest
import torch

from sagellm.core.errors import ConfigError, PluginNotFoundError
from sagellm.engine.layers.linear import DENSE
from sagellm.engine.runtime.config import NativeRuntimeConfig
from sagellm.engine.runtime.native import NativeRuntime
from sagellm.engine.testing import make_tiny_llama

TOKENS = [5, 17, 3, 99, 42, 7, 250, 11, 64, 128, 33, 2, 18]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # 64 hidden columns: every int4 group size the kernel takes below 128 divides it
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-q"), seed=3)


def _runtime(model_dir, **options) -> NativeRuntime:  # type: ignore[no-untyped-def]
    return NativeRuntime(NativeRuntimeConfig(model=str(model_dir), dtype="float32", **options))


def test_float_checkpoint_stays_dense_by_default(model_dir) -> None:  # type: ignore[no-untyped-def]
    rt = _runtime(model_dir, kernels="eager")
    assert rt.quantization == "none" and rt.kernels == "eager"
    assert all(layer.method is DENSE for layer in rt.model.projections().values())


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_weight_only_quantizers_stay_close_to_float(model_dir, name: str) -> None:  # type: ignore[no-untyped-def]
    ref = _runtime(model_dir, quantization="none", kernels="eager").run_sequence(TOKENS)
    rt = _runtime(
        model_dir,
        quantization=name,
        kernels="eager",
        quantization_options={"dense_min_rows": None},  # every row on the quantized kernel
    )
    methods = {layer.method.name for layer in rt.model.projections().values()}
    assert methods == ({"int8"} if name == "int8" else {"int4_g32", "int8"})
    got = rt.run_sequence(TOKENS)
    p, q = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl < (1e-3 if name == "int8" else 2e-2)


def test_quantized_layers_use_the_float_method_from_dense_min_rows(model_dir) -> None:  # type: ignore[no-untyped-def]
    ref = _runtime(model_dir, quantization="none", kernels="eager").run_sequence(TOKENS)
    rt = _runtime(
        model_dir, quantization="int4", kernels="eager", quantization_options={"dense_min_rows": 8}
    )
    # 13 rows >= 8: every projection takes its float weight, so logits equal float's
    assert torch.allclose(rt.run_sequence(TOKENS), ref, atol=1e-5)


def test_gguf_quantizer_on_a_float_checkpoint_says_what_to_use(model_dir) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="needs a GGUF checkpoint.*use 'int4' or 'int8'"):
        _runtime(model_dir, quantization="gguf")


def test_unknown_quantizer_and_kernel_provider_name_what_is_installed(model_dir) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PluginNotFoundError, match="named 'no_such_quant'.*installed: .*gguf"):
        _runtime(model_dir, quantization="no_such_quant")
    with pytest.raises(PluginNotFoundError, match="named 'no_such_kernels'.*installed: fused"):
        _runtime(model_dir, kernels="no_such_kernels")


def test_fused_kernels_give_the_eager_logits(model_dir) -> None:  # type: ignore[no-untyped-def]
    eager = _runtime(model_dir, quantization="none", kernels="eager")
    fused = _runtime(model_dir, quantization="none", kernels="fused")
    assert fused.kernels == "fused"
    assert torch.allclose(fused.run_sequence(TOKENS), eager.run_sequence(TOKENS), atol=1e-4)
