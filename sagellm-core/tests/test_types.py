"""Validation of the shared types: exact errors for bad values."""

from __future__ import annotations

import dataclasses
import math

import pytest
from pydantic import ValidationError

from sagellm.core.types import (
    DTYPE_BYTES,
    SLO,
    CommConfig,
    ExecutionPlan,
    GenerationRequest,
    IRGraph,
    IRNode,
    IRNodeKind,
    KVCacheSchema,
    MigrationPlan,
    MigrationResult,
    PrefixMatch,
    RequestMetrics,
    SamplingParams,
    ScheduledChunk,
    SequenceChunk,
)


def _errors(exc: pytest.ExceptionInfo[ValidationError]) -> list[tuple[tuple[object, ...], str]]:
    return [(e["loc"], e["type"]) for e in exc.value.errors()]


def test_empty_prompt_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(ValidationError) as info:
        GenerationRequest(request_id="r", prompt_token_ids=())
    assert "prompt_token_ids is empty: a request needs at least one token" in str(info.value)


def test_empty_request_id_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        GenerationRequest(request_id="", prompt_token_ids=(1,))
    assert _errors(info) == [(("request_id",), "string_too_short")]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("n", 0, "greater_than_equal"),
        ("n", 129, "less_than_equal"),
        ("max_tokens", 0, "greater_than_equal"),
        ("temperature", -0.1, "greater_than_equal"),
        ("top_k", -1, "greater_than_equal"),
        ("top_p", 0.0, "greater_than"),
        ("top_p", 1.5, "less_than_equal"),
        ("min_p", 1.1, "less_than_equal"),
        ("repetition_penalty", 0.0, "greater_than"),
        ("presence_penalty", 2.5, "less_than_equal"),
        ("frequency_penalty", -2.5, "greater_than_equal"),
        ("logprobs", 21, "less_than_equal"),
        ("temperature", "hot", "float_parsing"),
        ("bogus", 1, "extra_forbidden"),
    ],
)
def test_bad_sampling_values(field: str, value: object, error: str) -> None:
    with pytest.raises(ValidationError) as info:
        SamplingParams(**{field: value})
    assert _errors(info) == [((field,), error)]


def test_sampling_defaults_and_greedy() -> None:
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k) == (1, 16, 1.0, 1.0, 0)
    assert p.greedy is False
    assert SamplingParams(temperature=0).greedy is True


def test_models_are_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(ValidationError) as info:
        p.temperature = 0.5  # type: ignore[misc, unused-ignore]
    assert _errors(info) == [(("temperature",), "frozen_instance")]


def test_slo_must_be_positive() -> None:
    with pytest.raises(ValidationError) as info:
        SLO(ttft_ms=0)
    assert _errors(info) == [(("ttft_ms",), "greater_than")]


def test_isolation_key() -> None:
    base = {"request_id": "r", "prompt_token_ids": (1,)}
    assert GenerationRequest(**base).isolation_key == ""
    assert GenerationRequest(**base, tenant="t").isolation_key == "t\x00"
    assert GenerationRequest(**base, tenant="t", cache_salt="s").isolation_key == "t\x00s"
    assert GenerationRequest(**base, cache_salt="s").isolation_key == "\x00s"


def test_prefix_caching_is_on_unless_skipped() -> None:
    base = {"request_id": "r", "prompt_token_ids": (1,)}
    assert GenerationRequest(**base).skip_prefix_cache is False
    skipped = GenerationRequest(**base, skip_prefix_cache=True)
    assert skipped.skip_prefix_cache is True and skipped.isolation_key == ""


def test_kv_cache_schema_sizes() -> None:
    s = KVCacheSchema(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="bfloat16")
    assert s.bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert s.bytes_per_block == s.bytes_per_token * 16
    assert [s.num_blocks_for(n) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]
    with pytest.raises(ValidationError) as info:
        KVCacheSchema(num_layers=1, num_kv_heads=1, head_dim=1, dtype="float64")
    assert _errors(info) == [(("dtype",), "literal_error")]
    with pytest.raises(ValidationError) as info:
        KVCacheSchema(num_layers=0, num_kv_heads=1, head_dim=1)
    assert _errors(info) == [(("num_layers",), "greater_than_equal")]


def test_quantized_kv_cache_schema_counts_its_scales() -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64
    dims = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "block_size": 16}
    bf16 = KVCacheSchema(**dims, dtype="bfloat16")
    assert (bf16.scale_bytes, bf16.head_size, bf16.is_quantized) == (0, 64, False)
    assert bf16.bytes_per_token == 23_040  # 128 bytes per token-head, keys and values
    for dtype in ("int8", "float8_e4m3fn", "float8_e5m2"):
        s = KVCacheSchema(**dims, dtype=dtype, scale_bytes=2)
        assert (s.head_size, s.is_quantized) == (66, True)
        assert s.bytes_per_token == 2 * 30 * 3 * 66 == 11_880  # 66 bytes per token-head
        assert s.bytes_per_block == 16 * 11_880
    assert DTYPE_BYTES["float8_e5m2"] == 1
    # a float16 cache with a scale would need whole elements
    assert KVCacheSchema(**dims, dtype="float16", scale_bytes=4).head_size == 66
    with pytest.raises(ValidationError, match="not a whole number of float16 elements"):
        KVCacheSchema(**dims, dtype="float16", scale_bytes=3)
    with pytest.raises(ValidationError) as info:
        KVCacheSchema(**dims, dtype="int8", scale_bytes=-1)
    assert _errors(info) == [(("scale_bytes",), "greater_than_equal")]


def test_comm_config_rank_must_be_below_world_size() -> None:
    with pytest.raises(ValidationError) as info:
        CommConfig(world_size=2, rank=2)
    assert "rank 2 is not below world_size 2" in str(info.value)


def test_prefix_match_properties() -> None:
    m = PrefixMatch(block_ids=(1, 2), num_tokens=8, num_query_tokens=11)
    assert (m.remaining_tokens, m.hit) == (3, True)
    assert PrefixMatch((), 0, 5).hit is False


def test_hot_path_types_are_frozen_slotted_dataclasses() -> None:
    c = ScheduledChunk("r", (1, 2), 0, (0,), True, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.sample = False  # type: ignore[misc]
    assert not hasattr(c, "__dict__")


def test_execution_plan_compute_chunks_in_graph_order() -> None:
    a = SequenceChunk("a", (1, 2, 3), 0, (0,), True)
    b = SequenceChunk("b", (9,), 5, (1, 2), True)
    migrate = IRNode(0, IRNodeKind.KV_MIGRATE, migrations=(MigrationPlan("host", "device", (3,)),))
    graph = IRGraph(
        (
            migrate,
            IRNode(1, IRNodeKind.PREFILL_CHUNK, (0,), (a,)),
            IRNode(2, IRNodeKind.DECODE_BATCH, (0,), (b,)),
            IRNode(3, IRNodeKind.SAMPLE, (1, 2)),
        )
    )
    plan = ExecutionPlan(7, graph, ("a", "b"))
    assert plan.compute_chunks == (a, b)
    assert graph.node(2).num_tokens == 1
    assert graph.of_kind(IRNodeKind.KV_MIGRATE) == (migrate,)
    with pytest.raises(KeyError):
        graph.node(99)


def test_migration_bandwidth_and_request_metrics() -> None:
    r = MigrationResult(MigrationPlan("device", "host", (1,)), num_bytes=2_000_000_000, seconds=2.0)
    assert r.bandwidth_gbps == 1.0
    assert math.isinf(MigrationResult(r.plan, 1, 0.0).bandwidth_gbps)
    m = RequestMetrics(
        arrival_time=1.0, first_token_time=1.5, finished_time=3.5, num_output_tokens=5
    )
    assert m.ttft == 0.5 and m.tpot == 0.5
    assert RequestMetrics().ttft is None
