"""The seeded LLM KV trace and the Zipf traces."""

from __future__ import annotations

from collections import Counter

import pytest

from sagellm.core.types import RequestKind
from sagellm.eviction import KVTraceConfig, ZipfTraceConfig
from sagellm.eviction.trace import KIND_INDEX, kv_trace, zipf_keys, zipf_trace

SMALL = KVTraceConfig(duration_seconds=300.0, seed=7)


@pytest.fixture(scope="module")
def trace():  # type: ignore[no-untyped-def]
    return kv_trace(SMALL)


def test_same_seed_same_trace_other_seed_other_trace(trace) -> None:  # type: ignore[no-untyped-def]
    again = kv_trace(SMALL)
    assert again.keys == trace.keys and again.times == trace.times
    assert kv_trace(KVTraceConfig(duration_seconds=300.0, seed=8)).keys != trace.keys


def test_times_are_ordered_and_features_present(trace) -> None:  # type: ignore[no-untyped-def]
    assert trace.times == sorted(trace.times)
    assert len(trace.keys) == len(trace.prefix_depths) == len(trace.kinds) == len(trace.tenants)
    feats = trace.features()
    assert set(feats[0]) == {"prefix_depth", "request_kind", "tenant_hash"}
    assert set(trace.kinds) == {int(v) for v in KIND_INDEX.values()}
    for request in range(trace.num_requests):
        start = trace.request_starts[request]
        end = trace.request_starts[request + 1] if request + 1 < trace.num_requests else len(trace)
        # a request reads its chain from the first block on
        assert trace.prefix_depths[start:end] == [16 * (i + 1) for i in range(end - start)]


def test_chat_turns_reread_their_context_and_append(trace) -> None:  # type: ignore[no-untyped-def]
    chat = int(KIND_INDEX[RequestKind.CHAT])
    requests = trace.requests()
    continued = 0
    for i, blocks in enumerate(requests):
        if trace.kinds[trace.request_starts[i]] != chat:
            continue
        # an earlier request of the same chat is a strict prefix of this one
        for j in range(i):
            prev = requests[j]
            if len(prev) < len(blocks) and blocks[: len(prev)] == prev and len(prev) > 40:
                continued += 1
                break
    assert continued > 20


def test_one_offs_never_recur_and_system_prompts_are_shared(trace) -> None:  # type: ignore[no-untyped-def]
    one_off = int(KIND_INDEX[RequestKind.ONE_OFF])
    counts = Counter(trace.keys)
    one_off_keys = {k for k, kind in zip(trace.keys, trace.kinds) if kind == one_off}
    assert one_off_keys and all(counts[k] == 1 for k in one_off_keys)
    first_blocks = Counter(blocks[0] for blocks in trace.requests() if blocks)
    # a few system prompts start most requests, the most popular one clearly ahead
    top = first_blocks.most_common(2)
    assert top[0][1] > top[1][1] > 10


def test_block_keys_are_hash_chained(trace) -> None:  # type: ignore[no-untyped-def]
    # the same key always sits at the same depth: it encodes its whole prefix
    depth: dict[int, int] = {}
    for k, d in zip(trace.keys, trace.prefix_depths):
        assert depth.setdefault(k, d) == d


def test_zipf_is_seeded_and_skewed() -> None:
    keys = zipf_trace(1.0, num_objects=100, num_requests=5000, seed=1)
    assert keys == zipf_keys(ZipfTraceConfig(alpha=1.0, num_objects=100, num_requests=5000, seed=1))
    counts = Counter(keys)
    assert counts[0] > counts[9] > counts[99]
    assert set(keys) <= set(range(100))
    uniform = Counter(zipf_trace(0.0, num_objects=10, num_requests=10000, seed=1))
    assert max(uniform.values()) < 1.2 * min(uniform.values())


def test_bad_trace_config_is_explained() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="system_prompt_tokens must be"):
        KVTraceConfig(system_prompt_tokens=(500, 100))
    with pytest.raises(ValidationError, match="at least one of chat_share"):
        KVTraceConfig(chat_share=0, few_shot_share=0, completion_share=0, one_off_share=0)
