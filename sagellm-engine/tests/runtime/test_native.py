"""NativeRuntime against transformers' dense Llama on tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm.core.errors import CapabilityMismatchError, ConfigError, SageLLMError
from sagellm.core.protocols import Runtime
from sagellm.core.types import KVCacheSchema
from sagellm.engine.runtime.config import NativeRuntimeConfig
from sagellm.engine.runtime.native import NativeRuntime
from sagellm.engine.testing import make_tiny_llama

from .conftest import bind_pool
from .helpers import chunk, make_plan, random_tokens, reference_logits

# fp32 against fp32: differences come from summation order only
ATOL = 1e-4


def run_prefill_in_chunks(rt, pool, tokens, sizes, block_size=4):
    """Feed ``tokens`` in chunks of ``sizes``; return the logits row of each chunk's end."""
    blocks = pool.allocate(-(-len(tokens) // block_size))
    rows, start = [], 0
    for n in sizes:
        out = rt.execute(make_plan([chunk("r", tokens[start : start + n], start, blocks)]))
        assert out.request_ids == ("r",)
        rows.append(out.logits[0])
        start += n
    assert start == len(tokens)
    return blocks, rows


def test_is_a_runtime_and_describes_itself(rt) -> None:
    runtime, _ = rt
    assert isinstance(runtime, Runtime)
    assert runtime.dtype == torch.float32
    assert runtime.kv_cache_schema(8) == KVCacheSchema(
        num_layers=2, num_kv_heads=2, head_dim=16, block_size=8, dtype="float32"
    )
    assert runtime.kv_cache_schema(8, "bfloat16").dtype == "bfloat16"
    caps = runtime.capabilities()
    assert caps.max_model_len == 1024
    assert caps.dtypes == ("float32", "bfloat16")
    assert "cpu" in caps.devices
    assert runtime.model_config.vocab_size == 320
    assert runtime.source.kind == "safetensors"


def test_prefill_matches_reference(rt, tiny_dir) -> None:
    runtime, pool = rt
    tokens = random_tokens(23, 320, seed=1)
    ref = reference_logits(tiny_dir, tokens)
    _, rows = run_prefill_in_chunks(runtime, pool, tokens, [23])
    assert rows[0].dtype == torch.float32
    assert (rows[0] - ref[-1]).abs().max() < ATOL


@pytest.mark.parametrize("sizes", [[1] * 13, [5, 8], [4, 4, 5], [3, 1, 7, 2], [12, 1]])
def test_chunked_prefill_and_decode_match_reference(rt, tiny_dir, sizes) -> None:
    runtime, pool = rt
    tokens = random_tokens(13, 320, seed=2)
    ref = reference_logits(tiny_dir, tokens)
    _, rows = run_prefill_in_chunks(runtime, pool, tokens, sizes)
    ends = [sum(sizes[: i + 1]) - 1 for i in range(len(sizes))]
    for row, end in zip(rows, ends):
        assert (row - ref[end]).abs().max() < ATOL, f"position {end}"


def test_prefix_blocks_shared_between_requests(rt, tiny_dir) -> None:
    """A second request reusing the first one's full prefix blocks (a prefix-cache hit)."""
    runtime, pool = rt
    prefix = random_tokens(8, 320, seed=3)
    a = prefix + random_tokens(3, 320, seed=4)
    b = prefix + random_tokens(5, 320, seed=5)
    blocks_a, _ = run_prefill_in_chunks(runtime, pool, a, [11])
    blocks_b = blocks_a[:2] + pool.allocate(2)
    out = runtime.execute(make_plan([chunk("b", b[8:], 8, blocks_b)]))
    assert (out.logits[0] - reference_logits(tiny_dir, b)[-1]).abs().max() < ATOL


def test_mixed_batch_is_batch_invariant(rt, tiny_dir) -> None:
    """Prefills, continuations and decodes of several requests in one plan."""
    runtime, pool = rt
    seqs = {
        name: random_tokens(n, 320, seed=10 + i)
        for i, (name, n) in enumerate([("a", 9), ("b", 17), ("c", 6), ("d", 30), ("e", 4)])
    }
    refs = {k: reference_logits(tiny_dir, v) for k, v in seqs.items()}
    tables = {k: pool.allocate(-(-len(v) // 4)) for k, v in seqs.items()}
    # step 1: a fully, b first 10, d first 27 (no sample), c first 5
    step1 = [
        chunk("a", seqs["a"], 0, tables["a"]),
        chunk("b", seqs["b"][:10], 0, tables["b"]),
        chunk("d", seqs["d"][:27], 0, tables["d"], sample=False),
        chunk("c", seqs["c"][:5], 0, tables["c"]),
    ]
    out = runtime.execute(make_plan(step1))
    assert out.request_ids == ("a", "b", "c")
    assert out.logits.shape == (3, 320)
    for i, (rid, end) in enumerate([("a", 8), ("b", 9), ("c", 4)]):
        assert (out.logits[i] - refs[rid][end]).abs().max() < ATOL, rid
    # step 2: decodes of c (pos 5) and d continuation (27..29) + b rest + e whole
    step2_prefill = [
        chunk("b", seqs["b"][10:], 10, tables["b"]),
        chunk("d", seqs["d"][27:], 27, tables["d"]),
        chunk("e", seqs["e"], 0, tables["e"]),
    ]
    step2_decode = [chunk("c", seqs["c"][5:], 5, tables["c"])]
    out = runtime.execute(make_plan(step2_prefill, decode=step2_decode))
    assert out.request_ids == ("b", "d", "e", "c")
    for i, (rid, end) in enumerate([("b", 16), ("d", 29), ("e", 3), ("c", 5)]):
        assert (out.logits[i] - refs[rid][end]).abs().max() < ATOL, rid


def test_decode_batch_of_different_lengths_equals_alone(rt) -> None:
    runtime, pool = rt
    lengths = [3, 11, 1, 7, 16]
    seqs = [random_tokens(n + 1, 320, seed=40 + n) for n in lengths]
    tables = [pool.allocate(5) for _ in seqs]
    for i, s in enumerate(seqs):
        runtime.execute(make_plan([chunk(f"s{i}", s[:-1], 0, tables[i], sample=False)]))
    decodes = [chunk(f"s{i}", s[-1:], len(s) - 1, tables[i]) for i, s in enumerate(seqs)]
    together = runtime.execute(make_plan([], decode=decodes)).logits
    for i, d in enumerate(decodes):
        alone = runtime.execute(make_plan([], decode=[d])).logits
        assert (alone[0] - together[i]).abs().max() < 1e-5


def test_decode_steps_follow_reference(rt, tiny_dir) -> None:
    runtime, pool = rt
    prompt = random_tokens(6, 320, seed=50)
    blocks = pool.allocate(4)
    out = runtime.execute(make_plan([chunk("g", prompt, 0, blocks)]))
    tokens = list(prompt)
    for _ in range(8):
        nxt = int(out.logits[0].argmax())
        tokens.append(nxt)
        out = runtime.execute(make_plan([], decode=[chunk("g", [nxt], len(tokens) - 1, blocks)]))
    ref = reference_logits(tiny_dir, tokens)
    assert (out.logits[0] - ref[-1]).abs().max() < ATOL


def test_non_sampled_plan_returns_no_rows_and_empty_plan_is_fine(rt) -> None:
    runtime, pool = rt
    blocks = pool.allocate(2)
    out = runtime.execute(make_plan([chunk("x", [5, 6, 7], 0, blocks, sample=False)]))
    assert out.request_ids == () and tuple(out.logits.shape) == (0, 320)
    out = runtime.execute(make_plan([]))
    assert out.request_ids == () and tuple(out.logits.shape) == (0, 320)


def test_bad_plans_are_explained(rt) -> None:
    runtime, pool = rt
    blocks = pool.allocate(1)
    with pytest.raises(ValueError, match="1 blocks of 4 tokens cannot hold 6 positions"):
        runtime.execute(make_plan([chunk("x", [5] * 6, 0, blocks)]))
    with pytest.raises(ValueError, match="token id 320 is outside the vocabulary 0..319"):
        runtime.execute(make_plan([chunk("x", [5, 320], 0, blocks)]))
    with pytest.raises(ValueError, match=r"block ids \[64\] outside the pool's 0..63"):
        runtime.execute(make_plan([chunk("x", [5], 0, [64])]))
    with pytest.raises(ValueError, match="beyond max_model_len=1024"):
        runtime.execute(make_plan([chunk("x", [5], 1024, list(range(64)) * 5)]))


def test_pool_binding_checks_the_schema(tiny_dir) -> None:
    from sagellm.kv_pool.config import PagedKVPoolConfig
    from sagellm.kv_pool.paged import PagedKVPool

    runtime = NativeRuntime(NativeRuntimeConfig(model=str(tiny_dir), dtype="float32"))
    with pytest.raises(SageLLMError, match="before bind_kv_pool"):
        runtime.execute(make_plan([chunk("x", [5], 0, [0])]))
    wrong = KVCacheSchema(num_layers=3, num_kv_heads=2, head_dim=16, block_size=4)
    pool = PagedKVPool(PagedKVPoolConfig(num_blocks=4), schema=wrong)
    with pytest.raises(
        CapabilityMismatchError, match=r"\(layers, kv_heads, head_dim\)=\(3, 2, 16\)"
    ):
        runtime.bind_kv_pool(pool)
    with pytest.raises(ConfigError, match="KV cache dtype 'uint8' is not supported"):
        runtime.kv_cache_schema(4, "uint8")


def test_max_model_len_beyond_the_model_is_refused(tiny_dir) -> None:
    with pytest.raises(ConfigError, match="max_model_len=2048 exceeds the 1024 positions"):
        NativeRuntime(NativeRuntimeConfig(model=str(tiny_dir), max_model_len=2048))


@pytest.mark.parametrize(
    "variant",
    [
        {"architecture": "qwen2", "num_kv_heads": 1},
        {"tie_word_embeddings": True, "num_kv_heads": 4},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ],
    ids=["qwen2-bias-mqa", "tied-mha", "llama3-rope", "linear-rope"],
)
def test_model_variants_match_reference(tmp_path, variant) -> None:
    path = make_tiny_llama(tmp_path / "m", seed=3, **variant)
    runtime = NativeRuntime(NativeRuntimeConfig(model=str(path), dtype="float32"))
    pool = bind_pool(runtime)
    tokens = random_tokens(90, 320, seed=7)
    ref = reference_logits(path, tokens)
    _, rows = run_prefill_in_chunks(runtime, pool, tokens, [40, 49, 1])
    for row, end in zip(rows, [39, 88, 89]):
        assert (row - ref[end]).abs().max() < ATOL, end


def test_bfloat16_stays_close_to_float32(tiny_dir, tiny_rt) -> None:
    runtime = NativeRuntime(NativeRuntimeConfig(model=str(tiny_dir), dtype="bfloat16"))
    assert runtime.dtype == torch.bfloat16
    assert runtime.kv_cache_schema(4).dtype == "bfloat16"
    pool16 = bind_pool(runtime)
    pool32 = bind_pool(tiny_rt)
    tokens = random_tokens(21, 320, seed=8)
    _, rows16 = run_prefill_in_chunks(runtime, pool16, tokens, [16, 4, 1])
    _, rows32 = run_prefill_in_chunks(tiny_rt, pool32, tokens, [16, 4, 1])
    for a, b in zip(rows16, rows32):
        assert a.dtype == torch.float32
        scale = b.abs().max()
        # bf16 keeps 8 bits of mantissa: a few percent of the logit scale after 2 layers
        assert (a - b).abs().max() < 0.05 * scale
        assert int(a.argmax()) == int(b.argmax())


def test_float32_model_with_bfloat16_kv_cache(tiny_dir, tiny_rt) -> None:
    pool = bind_pool(tiny_rt, dtype="bfloat16")
    tokens = random_tokens(12, 320, seed=9)
    ref = reference_logits(tiny_dir, tokens)
    _, rows = run_prefill_in_chunks(tiny_rt, pool, tokens, [8, 1, 3])
    for row, end in zip(rows, [7, 8, 11]):
        assert (row - ref[end]).abs().max() < 0.02 * ref[end].abs().max()


def test_auto_dtype_follows_the_cpu() -> None:
    from sagellm.engine.runtime.native import _cpu_has_native_bf16, resolve_dtype

    cpu = torch.device("cpu")
    want = torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", cpu) == want
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_prefill_attention_kernel_matches_sdpa(tiny_dir, kv_cache_dtype) -> None:
    """Chunks through the provider's flash kernel (bf16 where the CPU has AVX512-BF16,
    else float32 with AVX2), a prefix continuation included, give SDPA's logits."""
    from sagellm.engine.layers.attention import Attention
    from sagellm.kernel_fusion.extension import load_kernels
    from sagellm.kernel_fusion.provider import FusedKernels

    if "prefill_attention" not in FusedKernels().available_ops():
        pytest.skip("no prefill attention kernel on this CPU")
    bf16 = load_kernels().prefill_attention_supported(torch.bfloat16, 64)

    def runtime(**options):
        cfg = NativeRuntimeConfig(
            model=str(tiny_dir),
            dtype="bfloat16" if bf16 else "float32",
            kernels="fused",
            kernel_options=options,
            kv_cache_dtype=kv_cache_dtype,
            tune_prefill_attention=False,  # the kernel, whichever wins on this CPU
        )
        return NativeRuntime(cfg)

    fast, slow = runtime(), runtime(prefill_attention=False)
    layers = [m for m in fast.model.modules() if isinstance(m, Attention)]
    assert layers and all(m.prefill_kernel is not None for m in layers)
    assert all(m.prefill_kernel is None for m in slow.model.modules() if isinstance(m, Attention))
    tokens = random_tokens(45, 320, seed=11)
    _, rows_fast = run_prefill_in_chunks(fast, bind_pool(fast), tokens, [30, 14, 1])
    _, rows_slow = run_prefill_in_chunks(slow, bind_pool(slow), tokens, [30, 14, 1])
    for a, b in zip(rows_fast, rows_slow):
        assert (a - b).abs().max() < 0.03 * b.abs().max()
        assert int(a.argmax()) == int(b.argmax())


def test_prefill_attention_is_the_faster_of_kernel_and_sdpa_and_kept(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether prefill chunks attend through the provider's kernel or SDPA is measured
    once on the model's head shape, kept in a cache file (a second start reads it), and
    applied to every layer; tune_prefill_attention=False keeps the kernel."""
    from sagellm.engine.layers.attention import Attention
    from sagellm.kernel_fusion.provider import FusedKernels

    if "prefill_attention" not in FusedKernels().available_ops():
        pytest.skip("no prefill attention kernel on this CPU")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured: list[str] = []

    def fake(winner: str):
        def seconds(self: Any, tokens: int = 256, repeats: int = 7) -> dict[str, float]:
            measured.append(winner)
            return (
                {"kernel": 1.0, "sdpa": 2.0} if winner == "kernel" else {"kernel": 2.0, "sdpa": 1.0}
            )

        return seconds

    def runtime(**kw: Any) -> NativeRuntime:
        kw.setdefault("kernels", "fused")
        return NativeRuntime(NativeRuntimeConfig(model=str(tiny_dir), dtype="float32", **kw))

    def kernels(rt: NativeRuntime) -> set[bool]:
        return {
            m.prefill_kernel is not None for m in rt.model.modules() if isinstance(m, Attention)
        }

    monkeypatch.setattr(NativeRuntime, "_prefill_attention_seconds", fake("sdpa"))
    rt = runtime()
    assert rt.prefill_attention == "sdpa" and kernels(rt) == {False} and measured == ["sdpa"]
    (cache,) = (tmp_path / "sagellm" / "tuning").glob("prefill-attention-*.json")
    assert cache.read_text() == '{"use": "sdpa"}\n'
    monkeypatch.setattr(NativeRuntime, "_prefill_attention_seconds", fake("kernel"))
    assert runtime().prefill_attention == "sdpa" and measured == ["sdpa"]  # read, not measured
    cache.unlink()
    rt = runtime()
    assert rt.prefill_attention == "kernel" and kernels(rt) == {True}
    assert measured == ["sdpa", "kernel"]
    off = runtime(tune_prefill_attention=False)
    assert off.prefill_attention == "kernel" and kernels(off) == {True}
    assert runtime(kernels="eager").prefill_attention == ""  # eager: SDPA, nothing to choose
    # the measurement itself runs on the model's shape and returns both timings
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
    secs = runtime()._prefill_attention_seconds(tokens=32, repeats=2)
    assert set(secs) == {"kernel", "sdpa"} and all(t > 0 for t in secs.values())


def test_skip_layers_leaves_layers_out_and_can_change_on_a_full_model(tiny_dir: Path) -> None:
    """``skip_layers`` (the layer_skip proposer's draft): the KV schema has the kept
    layers, and set_skip_layers on a model loaded whole gives the same numbers."""
    tokens = [1, 5, 9, 13, 17, 21]

    def make(**kw: Any) -> NativeRuntime:
        return NativeRuntime(
            NativeRuntimeConfig(model=str(tiny_dir), dtype="float32", num_threads=1, **kw)
        )

    skipped = make(skip_layers=(1,))
    assert skipped.skip_layers == (1,) and len(skipped.model.layers) == 1
    assert skipped.kv_cache_schema(16).num_layers == 1
    full = make()
    whole = full.run_sequence(tokens)
    full.set_skip_layers([1])
    assert full.kv_cache_schema(16).num_layers == 1
    assert torch.equal(full.run_sequence(tokens), skipped.run_sequence(tokens))
    assert not torch.equal(whole, skipped.run_sequence(tokens))
    full.set_skip_layers(())
    assert torch.equal(full.run_sequence(tokens), whole)
    with pytest.raises(ConfigError, match=r"skip_layers \[2\] are not layers of this model"):
        make(skip_layers=(2,))
    with pytest.raises(ConfigError, match="leaves none of the model's 2 layers"):
        make(skip_layers=(0, 1))
    with pytest.raises(ConfigError, match="needs a model loaded with every layer"):
        skipped.set_skip_layers(())


def test_loading_leaves_torch_s_compiler_stack_unimported(tiny_dir: Path) -> None:
    """Building the model on the meta device must not run the meta device's Python
    references (they import sympy and dynamo, ~70 MB resident for the process's life)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sagellm.engine.runtime.config import NativeRuntimeConfig\n"
        "from sagellm.engine.runtime.native import NativeRuntime\n"
        f"NativeRuntime(NativeRuntimeConfig(model={str(tiny_dir)!r}, dtype='bfloat16'))\n"
        "print(sorted(m for m in ('sympy', 'torch._dynamo', 'torch._inductor') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
