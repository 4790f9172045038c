"""The calibrating quantizers on the engine's own model (skipped without sagellm-engine).

A random tiny Llama from the engine's test helpers: the quantizers hook its ``Linear``
projections during ``run_sequence`` and the engine computes through their methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("sagellm.engine")
pytest.importorskip("safetensors")

from sagellm.core import registry  # noqa: E402
from sagellm.quantization.calibration import shipped_text  # noqa: E402
from sagellm.quantization.eval import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sagellm.engine.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden_size=128, intermediate_size=256)


def _runtime(model_dir: Path) -> Any:
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    cfg = NativeRuntimeConfig(
        model=str(model_dir), dtype="float32", quantization="none", kernels="eager"
    )
    return NativeRuntime(cfg)


def _quantized(model_dir: Path, name: str, options: dict[str, Any]) -> tuple[Any, Any]:
    from sagellm.engine.models.tokenizer import load_tokenizer

    rt = _runtime(model_dir)
    tok = load_tokenizer(rt.source)
    quantizer = registry.load(
        "quantization", name, {"dense_min_rows": None, **options}, tokenize=tok.encode
    )
    layers = rt.model.projections()
    quantizer.prepare(layers, rt.run_sequence)
    for layer_name, layer in layers.items():
        method = quantizer.linear_method(layer_name, layer)
        if method is not None:
            layer.set_method(method)
    return rt, tok


def test_gptq_and_awq_beat_round_to_nearest_on_the_engine_model(model_dir: Path) -> None:
    ref = _runtime(model_dir)
    kl = {}
    for name in ("int4", "gptq", "awq"):
        options = {"group_size": 64, "bits": 3, "head": "dense"}
        if name != "int4":
            options["calibration_tokens"] = 1024
        rt, tok = _quantized(model_dir, name, options)
        ids = tok.encode(shipped_text("heldout"))[:256]
        report = evaluate(ref.run_sequence, rt.run_sequence, ids, seq_len=128)
        assert 0 < report.mean_kl < 1
        kl[name] = report.mean_kl
    assert kl["gptq"] < kl["int4"] and kl["awq"] < kl["int4"], kl


def test_smoothquant_runs_the_engine_model_close_to_float(model_dir: Path) -> None:
    ref = _runtime(model_dir)
    rt, tok = _quantized(model_dir, "smoothquant", {"calibration_tokens": 512})
    ids = tok.encode(shipped_text("heldout"))[:128]
    report = evaluate(ref.run_sequence, rt.run_sequence, ids)
    assert report.top1_agreement > 0.9 and report.mean_kl < 0.05, report
    with torch.no_grad():
        assert torch.isfinite(rt.run_sequence(ids[:1])).all()  # one row: weight-only int8
