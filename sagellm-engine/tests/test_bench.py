"""The side-by-side benchmark on the tiny model (small workload)."""

from __future__ import annotations

import math

import pytest

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


def test_disagg_bench_reads_counters_from_metrics_text() -> None:
    from sagellm.engine.bench.disagg import metric_sum

    text = (
        "# HELP sagellm_kv_transfer_num_loads_total kv_transfer.num_loads\n"
        'sagellm_kv_transfer_num_loads_total{model_name="a"} 3.0\n'
        'sagellm_kv_transfer_num_loads_total{model_name="b"} 2.0\n'
        'sagellm_kv_transfer_num_loads_created{model_name="a"} 1.7e9\n'
        "sagellm_kv_transfer_load_seconds_total 0.25\n"
    )
    assert metric_sum(text, "sagellm_kv_transfer_num_loads_total") == 5.0
    assert metric_sum(text, "sagellm_kv_transfer_load_seconds_total") == 0.25
    assert metric_sum(text, "sagellm_kv_channel_bytes_received_total") == 0.0


def test_router_bench_summary_has_the_hit_share() -> None:
    from sagellm.engine.bench.router import RunResult, summarize

    runs = [
        RunResult("rr", ttft=[0.2, 0.4], hit_tokens=10, prompt_tokens=40),
        RunResult("ca", ttft=[0.1, 0.1], hit_tokens=30, prompt_tokens=40),
        RunResult("ca", ttft=[0.1], hit_tokens=5, prompt_tokens=10),
    ]
    out = summarize(runs, "rr")
    assert (out["rr"]["hit_rate"], out["ca"]["hit_rate"]) == (0.25, 0.7)
    assert out["ca"]["mean_ratio"] == pytest.approx(0.1 / 0.3)


@pytest.mark.integration  # needs sagellm-topology
def test_tensor_parallel_prediction_adds_the_step_s_collectives() -> None:
    from sagellm.engine.bench.tensor_parallel import SHAPE, _predict

    LinkCost = pytest.importorskip("sagellm.topology.costs").LinkCost

    link = LinkCost(alpha_us=10.0, beta_gbps=2.0)
    coll = {"all_gather_1": 50.0, "send": 20.0}
    n = 2 * SHAPE["num_layers"] + 1
    want = 40.0 / 2 + (n * link.time_us(SHAPE["hidden_size"] * 4) + 50.0 + 40.0) / 1e3
    assert _predict(40.0, 1, coll, link) == pytest.approx(want)


def test_server_itl_gaps_and_summary() -> None:
    from sagellm.engine.bench.server_itl import gaps, summarize

    times = [0.0, 0.5, 0.51, 0.53, 0.56]
    assert gaps(times) == pytest.approx([0.01, 0.02, 0.03])  # the prefill gap left out
    assert gaps(times, skip=0) == pytest.approx([0.5, 0.01, 0.02, 0.03])
    text = summarize([[0.011, 0.011, 0.012]], [[0.010, 0.010, 0.010]])
    assert text.splitlines()[1].split() == ["1", "11.00", "10.00"]
    assert "server / offline = 1.100 (target <= 1.10)" in text
