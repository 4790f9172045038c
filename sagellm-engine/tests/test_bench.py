"""The side-by-side benchmark on the tiny model (small workload)."""

from __future__ import annotations

import math

from sagellm.engine.bench.runner import format_table, run
from sagellm.engine.bench.workloads import Workload, percentile, random_prompts


def test_percentile_and_prompts() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    a = random_prompts(3, 5, 100, seed=1)
    assert a == random_prompts(3, 5, 100, seed=1)
    assert len(a) == 3 and all(len(p) == 5 and all(0 < t < 100 for t in p) for p in a)


def test_bench_reports_sagellm_and_transformers_side_by_side(tiny_llm) -> None:
    w = Workload(
        num_requests=4,
        prompt_len=8,
        output_len=4,
        decode_len=4,
        prefill_len=16,
        concurrency=2,
        server_requests=4,
    )
    report = run(tiny_llm, w, skip=("llama.cpp",), progress=lambda m: None)
    ours = report["results"]["sagellm"]
    for key in (
        "throughput_tok_s",
        "decode_b1_tok_s",
        "prefill_tok_s",
        "server_ttft_p50_s",
        "server_tpot_p99_s",
        "peak_rss_mib",
    ):
        assert ours[key] > 0, key
    assert "transformers_float32" in report["results"]
    table = format_table(report)
    assert "sagellm/transformers_float32" in table
    assert "matmul peak" in table
