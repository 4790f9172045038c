"""The 2:4 semi-structured method: detected at run time; on CPU it says why not."""

from __future__ import annotations

import pytest
import torch

from sagellm.core.testing.quantizer import make_linear
from sagellm.sparsity.config import MagnitudeConfig
from sagellm.sparsity.methods import SemiStructuredMethod, semi_structured_support
from sagellm.sparsity.pruning import MagnitudeSparsifier

_CUDA_2_4 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def test_cpu_has_no_semi_structured_kernel() -> None:
    assert semi_structured_support(torch.device("cpu"), torch.bfloat16) == (
        "torch has semi-structured (2:4) kernels only on CUDA, not on cpu: the pruned "
        "weight is multiplied densely"
    )


def test_torch_itself_refuses_cpu_tensors() -> None:
    # the fact the detection encodes: torch's conversion is CUDA-only
    from torch.sparse import to_sparse_semi_structured

    w = torch.tensor([[1.0, 0.0, 2.0, 0.0] * 16] * 64, dtype=torch.float16)
    with pytest.raises((RuntimeError, NotImplementedError, ValueError)):
        to_sparse_semi_structured(w)


def test_on_cpu_2_of_4_layers_keep_the_dense_product() -> None:
    layer = make_linear(64, 64, seed=1, dtype="bfloat16")
    s = MagnitudeSparsifier(MagnitudeConfig(pattern="2:4", targets=("o_proj",)))
    layers = {"layers.0.o_proj": layer}
    s.prepare(layers)
    s.apply(layers)
    assert s.linear_method("layers.0.o_proj", layer) is None
    with pytest.raises(ValueError) as info:
        SemiStructuredMethod().process_weights(layer)
    assert str(info.value) == (
        "sparse_2:4: torch has semi-structured (2:4) kernels only on CUDA, not on cpu: the "
        "pruned weight is multiplied densely"
    )


@pytest.mark.skipif(not _CUDA_2_4, reason="needs a CUDA GPU of compute capability 8.0+")
def test_cuda_2_of_4_computes_the_pruned_product() -> None:
    layer = make_linear(128, 128, seed=2, dtype="float16").cuda()
    s = MagnitudeSparsifier(MagnitudeConfig(pattern="2:4", targets=("o_proj",)))
    layers = {"layers.0.o_proj": layer}
    s.prepare(layers)
    s.apply(layers)
    method = s.linear_method("layers.0.o_proj", layer)
    assert isinstance(method, SemiStructuredMethod)
    method.process_weights(layer)
    x = torch.randn(16, 128, dtype=torch.float16, device="cuda")
    ref = torch.nn.functional.linear(x.float(), layer.weight.float())
    got = method.apply(layer, x).float()
    assert float((got - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.skipif(not _CUDA_2_4, reason="needs a CUDA GPU of compute capability 8.0+")
def test_cuda_refuses_a_weight_that_is_not_2_of_4() -> None:
    layer = make_linear(64, 64, seed=3, dtype="float16").cuda()
    with pytest.raises(ValueError, match="the weight is not 2:4 sparse"):
        SemiStructuredMethod().process_weights(layer)
