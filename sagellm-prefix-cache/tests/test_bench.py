"""The benchmark harness on a tiny workload: the three indexes agree on every lookup."""

from __future__ import annotations

import pytest

from sagellm.prefix_cache.baseline import LinearScanPrefixIndex
from sagellm.prefix_cache.bench import (
    PrefixWorkload,
    build_index,
    format_table,
    measure,
    percentile,
)


def tiny() -> PrefixWorkload:
    return PrefixWorkload(
        num_systems=3,
        num_templates=2,
        num_questions=2,
        system_len=32,
        template_len=16,
        question_len=16,
        block_size=8,
        seed=5,
    )


def test_workload_is_seeded_and_shaped() -> None:
    w = tiny()
    assert w.num_prefixes == 12 and w.prefix_len == 64
    assert list(w.prefixes()) == list(tiny().prefixes())
    assert all(len(p) == 64 for p in w.prefixes())
    assert w.prefix(1, 1, 0)[:48] == w.prefix(1, 1, 1)[:48]
    assert w.prefix(1, 1, 0)[48:] != w.prefix(1, 1, 1)[48:]


def test_indexes_agree_and_table_lists_them() -> None:
    w = tiny()
    results = measure(w, num_queries=40, num_naive_queries=40, num_inserts=5)
    assert list(results) == ["radix", "block_hash", "naive"]
    hit = results["radix"]["hit_rate"]
    assert 0.3 < hit < 1.0
    assert results["block_hash"]["hit_rate"] == hit == results["naive"]["hit_rate"]
    table = format_table(w, results)
    assert "| radix |" in table and "| naive | " in table and "12 cached prefixes" in table


def test_linear_scan_matches_full_blocks_only() -> None:
    index = LinearScanPrefixIndex(block_size=2)
    index.insert([1, 2, 3, 4, 5], [10, 11, 12])
    index.insert([1, 2, 7, 7], [20, 21])
    m = index.match([1, 2, 3, 4, 6, 6])
    assert (m.block_ids, m.num_tokens, m.num_query_tokens) == ((10, 11), 4, 6)
    assert index.match([1, 3]).num_tokens == 0
    assert build_index("naive", tiny()).num_prefixes == 12


def test_percentile_is_nearest_rank() -> None:
    samples = [1000 * i for i in range(1, 101)]
    assert percentile(samples, 0.5) == 50.0
    assert percentile(samples, 0.99) == 99.0
    with pytest.raises(ValueError, match="unknown index kind 'trie'"):
        build_index("trie", tiny())
