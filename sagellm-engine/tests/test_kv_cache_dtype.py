"""--kv-cache-dtype end to end: sizing, generation, prefix caching, what the builder refuses."""

from __future__ import annotations

import pytest

from sagellm.core.errors import CapabilityMismatchError
from sagellm.core.types import KVCacheSchema, SamplingParams
from sagellm.engine.args import make_engine_config
from sagellm.engine.builder import EngineBuilder
from sagellm.engine.config import BuildOptions

from .conftest import assert_no_leak, make_llm

GREEDY = SamplingParams(temperature=0, max_tokens=12)
PROMPTS = ["The quick brown fox jumps over", "a b c d e f g", "hello"]


@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_quantized_cache_generates_with_about_twice_the_blocks(tiny_model, dtype) -> None:
    # bfloat16 compute: 2 layers x (K, V) x 4 tokens x 2 KV heads x 16 dims x 2 bytes = 1024
    # bytes a block; int8/fp8: 16 values + 2 scale bytes = 576 bytes (1.78x at head_dim 16)
    base = make_llm(tiny_model, dtype="bfloat16", kv_cache_mib=1)
    assert base.engine.kv_pool.num_blocks == (1 << 20) // 1024 == 1024
    llm = make_llm(tiny_model, dtype="bfloat16", kv_cache_mib=1, kv_cache_dtype=dtype)
    pool = llm.engine.kv_pool
    assert pool.schema.scale_bytes == 2 and pool.schema.bytes_per_block == 576
    assert pool.num_blocks == (1 << 20) // 576 == 1820
    outs = llm.generate(PROMPTS, GREEDY)
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 12, 12]
    assert_no_leak(llm)


def test_kv_budget_gives_smollm2_1_94x_the_blocks() -> None:
    # SmolLM2-135M's layout (30 layers, 3 KV heads, head_dim 64): 66 bytes per token-head
    # instead of 128; the default 256 MiB budget
    dims = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "block_size": 16}
    bf16 = KVCacheSchema(**dims, dtype="bfloat16")
    int8 = KVCacheSchema(**dims, dtype="int8", scale_bytes=2)
    builder = EngineBuilder(make_engine_config()[0], BuildOptions(kv_cache_mib=256))
    blocks = [builder.kv_pool_options(s, 8192)["num_blocks"] for s in (bf16, int8)]
    assert blocks == [728, 1412]  # 268435456 // 368640, 268435456 // 190080
    assert round(blocks[1] / blocks[0], 3) == 1.940


@pytest.mark.integration  # needs sagellm-prefix-cache
@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3"])
def test_prefix_cache_hits_on_a_quantized_cache_and_repeats_the_first_run(
    tiny_model, dtype
) -> None:
    llm = make_llm(tiny_model, num_blocks=128, prefix_cache="radix", kv_cache_dtype=dtype)
    prompt = "the same long prompt, reused: " * 3
    (first,) = llm.generate([prompt], GREEDY)
    (again,) = llm.generate([prompt], GREEDY)
    assert first.metrics.num_cached_tokens == 0
    full_blocks = (len(first.prompt_token_ids) - 1) // 4 * 4
    assert again.metrics.num_cached_tokens == full_blocks > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    index = llm.engine.parts.prefix_index
    pool = llm.engine.kv_pool
    assert pool.num_free_blocks + index.num_cached_blocks == pool.num_blocks
    pool.free(index.clear())
    assert_no_leak(llm)


def test_builder_refuses_a_kv_dtype_the_runtime_does_not_store(tiny_model, monkeypatch) -> None:
    from sagellm.engine.runtime.native import NativeRuntime

    cfg, opts = make_engine_config(
        model=str(tiny_model), dtype="float32", block_size=4, kv_cache_dtype="int8"
    )
    builder = EngineBuilder(cfg, opts)
    assert builder.runtime_options()["kv_cache_dtype"] == "int8"
    auto, _ = make_engine_config(model=str(tiny_model))
    assert "kv_cache_dtype" not in EngineBuilder(auto).runtime_options()
    # a runtime that ignores the option: the builder says so instead of serving float KV
    real = NativeRuntime.kv_cache_schema
    monkeypatch.setattr(
        NativeRuntime, "kv_cache_schema", lambda self, bs, dtype=None: real(self, bs, "float32")
    )
    with pytest.raises(CapabilityMismatchError, match="asks for a int8 KV cache but runtime"):
        builder.build()
    caps = builder.build_runtime().capabilities()
    floats_only = caps.model_copy(update={"kv_dtypes": ("float32", "bfloat16")})
    with pytest.raises(CapabilityMismatchError, match="stores KV caches in float32, bfloat16"):
        builder.check_capabilities(floats_only)


def test_cli_flag_reaches_the_config() -> None:
    import argparse

    from sagellm.engine.args import add_engine_arguments, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    cfg, _ = engine_config_from_args(parser.parse_args(["--kv-cache-dtype", "fp8_e5m2"]))
    assert cfg.kv_cache_dtype == "fp8_e5m2"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int4"])
