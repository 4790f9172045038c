"""Greedy tokens are unchanged by every installed KV component, and no KV block leaks.

Each installed prefix cache, eviction policy, scheduling policy and the tiered pool joins
these tests automatically through the registry; the reference is the plain configuration
(paged pool, FCFS, no prefix cache) on the same tiny random Llama.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sagellm.core import registry
from sagellm.core.types import SamplingParams

pytest.importorskip("sagellm.engine")

from sagellm.engine.llm import LLM  # noqa: E402

OPTIONS: dict[str, Any] = {
    "dtype": "float32",
    "block_size": 4,
    "num_threads": 1,
    "max_model_len": 64,
    "seed": 0,
}
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _names(group: str) -> list[str]:
    return sorted(p.name for p in registry.available(group))


def _prompts() -> list[list[int]]:
    """Requests sharing a 40-token prefix, two tenants' worth, plus one-off prompts."""
    shared = list(range(5, 45))
    out = [shared + [50 + i, 60 + i, 70 + i] for i in range(6)]
    out += [[90 + i] * (3 + i) for i in range(3)]
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sagellm.engine.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> list[list[int]]:
    llm = LLM(model=str(tiny_model), num_blocks=64, **OPTIONS)
    return [list(o.outputs[0].token_ids) for o in llm.generate(_prompts(), GREEDY)]


def _run_twice(llm: LLM) -> list[list[list[int]]]:
    """Two passes: the second one hits whatever the first one cached."""
    runs = []
    for _ in range(2):
        runs.append([list(o.outputs[0].token_ids) for o in llm.generate(_prompts(), GREEDY)])
    return runs


def _assert_no_leak(llm: LLM) -> None:
    """Every block is free or held by the prefix index alone; clearing the index frees all."""
    engine = llm.engine
    pool = engine.kv_pool
    index = engine.parts.prefix_index
    assert not engine.has_unfinished_requests()
    cached = index.num_cached_blocks if index is not None else 0
    assert pool.num_free_blocks + cached == pool.num_blocks, (
        f"{pool.num_blocks - pool.num_free_blocks - cached} KV blocks leaked"
    )
    if index is not None:
        pool.free(index.clear())
        assert pool.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize("prefix_cache", _names("prefix_cache"))
def test_prefix_cache_keeps_greedy_tokens(
    tiny_model: Path, reference: list[list[int]], prefix_cache: str
) -> None:
    # 64 blocks hold the whole working set: the second pass hits the shared prefix.
    llm = LLM(model=str(tiny_model), num_blocks=64, prefix_cache=prefix_cache, **OPTIONS)
    first, second = _run_twice(llm)
    assert first == reference
    assert second == reference
    stats = llm.engine.parts.prefix_index.make_stats()
    assert stats.num_hits > 0 and stats.num_matched_tokens > 0
    _assert_no_leak(llm)


@pytest.mark.parametrize("eviction", _names("eviction"))
@pytest.mark.parametrize("prefix_cache", _names("prefix_cache"))
def test_eviction_policy_keeps_greedy_tokens(
    tiny_model: Path, reference: list[list[int]], prefix_cache: str, eviction: str
) -> None:
    # 24 blocks force the index to evict while the requests run.
    llm = LLM(
        model=str(tiny_model),
        num_blocks=24,
        max_num_seqs=2,
        prefix_cache=prefix_cache,
        eviction=eviction,
        **OPTIONS,
    )
    first, second = _run_twice(llm)
    assert first == reference
    assert second == reference
    assert llm.engine.parts.eviction is not None
    _assert_no_leak(llm)


@pytest.mark.parametrize("scheduler", _names("scheduler"))
def test_scheduling_policy_keeps_greedy_tokens(
    tiny_model: Path, reference: list[list[int]], scheduler: str
) -> None:
    llm = LLM(model=str(tiny_model), num_blocks=64, scheduler=scheduler, **OPTIONS)
    first, second = _run_twice(llm)
    assert first == reference
    assert second == reference
    _assert_no_leak(llm)


@pytest.mark.parametrize("scheduler", _names("scheduler"))
def test_scheduling_policy_with_prefix_cache_keeps_greedy_tokens(
    tiny_model: Path, reference: list[list[int]], scheduler: str
) -> None:
    llm = LLM(
        model=str(tiny_model), num_blocks=32, scheduler=scheduler, prefix_cache="radix", **OPTIONS
    )
    first, second = _run_twice(llm)
    assert first == reference
    assert second == reference
    _assert_no_leak(llm)


@pytest.mark.skipif(
    "tiered" not in _names("kv_pool"), reason="sagellm-kv-pool tiered not installed"
)
def test_tiered_pool_keeps_greedy_tokens(tiny_model: Path, reference: list[list[int]]) -> None:
    llm = LLM(
        model=str(tiny_model), kv_pool="tiered", num_blocks=64, prefix_cache="radix", **OPTIONS
    )
    first, second = _run_twice(llm)
    assert first == reference
    assert second == reference
    _assert_no_leak(llm)


@pytest.mark.skipif(
    "tiered" not in _names("kv_pool"), reason="sagellm-kv-pool tiered not installed"
)
@pytest.mark.parametrize("prefix_cache", _names("prefix_cache"))
def test_tiers_demote_and_promote_without_changing_tokens(
    tiny_model: Path, reference: list[list[int]], prefix_cache: str
) -> None:
    # 20 device blocks cannot keep the first pass's prefixes: they go to the host tier
    # and come back when the second pass asks for them.
    llm = LLM(
        model=str(tiny_model),
        kv_pool="tiered",
        num_blocks=20,
        max_num_seqs=2,
        prefix_cache=prefix_cache,
        **OPTIONS,
    )
    first, second = _run_twice(llm)
    assert first == reference
    assert second == reference
    stats = llm.engine.parts.prefix_index.make_stats()
    assert stats.num_demoted_blocks > 0
    assert stats.num_promoted_blocks > 0
    _assert_no_leak(llm)


@pytest.mark.skipif(
    "tiered" not in _names("kv_pool"), reason="sagellm-kv-pool tiered not installed"
)
@pytest.mark.parametrize("eviction", _names("eviction"))
def test_tier_eviction_policy_keeps_greedy_tokens(
    tiny_model: Path, reference: list[list[int]], eviction: str
) -> None:
    # 20 device blocks and 6 host blocks (no disk): the device demotes, the host tier is
    # full and drops blocks in the policy's order, and the second pass promotes the rest.
    llm = LLM(
        model=str(tiny_model),
        kv_pool={"name": "tiered", "options": {"host": {"num_blocks": 6}, "disk": None}},
        num_blocks=20,
        max_num_seqs=2,
        prefix_cache="radix",
        eviction=eviction,
        **OPTIONS,
    )
    index = llm.engine.parts.prefix_index
    assert index.lower_policy is not None
    assert type(index.lower_policy) is type(llm.engine.parts.eviction)
    first, second = _run_twice(llm)
    assert first == reference
    assert second == reference
    stats = index.make_stats()
    assert stats.num_demoted_blocks > 0 and stats.num_dropped_blocks > 0
    assert stats.num_promoted_blocks > 0
    assert len(index.lower_policy) == index.num_lower_tier_blocks
    _assert_no_leak(llm)
    host = llm.engine.kv_pool.tier("host")
    assert host.num_free_blocks == host.num_blocks


@pytest.mark.skipif(
    not {"cost_aware"} <= set(_names("eviction")) or not _names("lifetime"),
    reason="needs sagellm-eviction cost_aware and a lifetime predictor",
)
def test_cost_aware_eviction_with_a_predictor_keeps_greedy_tokens(
    tiny_model: Path, reference: list[list[int]]
) -> None:
    llm = LLM(
        model=str(tiny_model),
        num_blocks=24,
        max_num_seqs=2,
        prefix_cache="radix",
        eviction="cost_aware",
        lifetime=_names("lifetime")[0],
        **OPTIONS,
    )
    policy = llm.engine.parts.eviction
    assert policy.predictor is llm.engine.parts.lifetime
    first, second = _run_twice(llm)
    assert first == reference
    assert second == reference
    assert llm.engine.parts.lifetime.make_stats().num_observations > 0
    _assert_no_leak(llm)
