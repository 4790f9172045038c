"""Two gloo ranks: overlapped equals serialised, handles are waited before use, the
measurement runs, and failures end every rank."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import rank_programs
import torch

from sagellm.core.errors import PlatformUnavailableError
from sagellm.overlap.launch import RankError, pick_backend, run_ranks
from sagellm.overlap.programs import Workload, check_outputs, measure, overlap_metrics
from sagellm.overlap.tp_mlp import TensorParallelMLP

W = Workload(num_layers=3, hidden_size=64, ffn_size=128, num_tokens=24, num_micro_batches=2)


@pytest.fixture(scope="module")
def outputs() -> list[dict]:
    return run_ranks(2, check_outputs, W, timeout_s=60)


def test_overlapped_output_is_bitwise_the_serialised_one(outputs: list[dict]) -> None:
    for r in outputs:
        assert r["backend"] == "gloo"
        assert len(r["overlap"]) == 2
        for a, b in zip(r["overlap"], r["serial"]):
            assert a.shape == b.shape == (12, 64)
            assert torch.equal(a, b)
    # both ranks hold the same (all-reduced) activations
    for a, b in zip(outputs[0]["overlap"], outputs[1]["overlap"]):
        assert torch.equal(a, b)


def test_micro_batches_match_the_unsplit_and_unsharded_step(outputs: list[dict]) -> None:
    r = outputs[0]
    joined = torch.cat(r["overlap"])
    # row blocks of a matmul and a two-way sum may round differently from the whole
    torch.testing.assert_close(joined, r["whole"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joined, r["reference"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(r["reference"], torch.zeros_like(r["reference"]))


def test_every_async_handle_completed_before_its_result_was_used(outputs: list[dict]) -> None:
    for r in outputs:
        # layers 1 and 2 of both micro-batches consume the previous layer's all-reduce
        assert sorted((layer, m) for layer, m, _, _ in r["consumed"]) == [
            (1, 0), (1, 1), (2, 0), (2, 1)
        ]  # fmt: skip
        assert all(done and same for _, _, done, same in r["consumed"])
        assert r["num_collectives"] == 6


def test_measure_reports_the_four_timings() -> None:
    w = Workload(num_layers=2, hidden_size=64, ffn_size=128, num_tokens=16)
    per_rank = run_ranks(2, measure, w, 2, timeout_s=60)
    for r in per_rank:
        assert r["reps"] == 2
        for k in ("compute", "communicate", "serial", "overlap"):
            assert r[k] > 0
        assert 0 <= r["overlap_wait_s"] < r["overlap"]
        assert 0 < r["overlap_compute_s"] < r["overlap"]
    assert mp.active_children() == []


def test_overlap_metrics_formula() -> None:
    t = {
        "compute": 0.030, "communicate": 0.010, "serial": 0.045, "overlap": 0.036,
        "overlap_wait_s": 0.004, "serial_wait_s": 0.012, "overlap_compute_s": 0.033,
        "compute_compute_s": 0.030,
    }  # fmt: skip
    m = overlap_metrics(t)
    assert m["hidden"] == pytest.approx(0.4)  # (30 + 10 - 36) / 10
    assert m["speedup"] == pytest.approx(1.25)
    assert m["idle_overlap"] == pytest.approx(0.004 / 0.036)
    assert m["idle_serial"] == pytest.approx(0.012 / 0.045)
    assert m["compute_inflation"] == pytest.approx(1.1)


def test_a_failing_rank_is_reported_and_no_rank_is_left() -> None:
    with pytest.raises(
        RankError, match=r"rank 1 failed:(.|\n)*compute failed at layer 1, micro-batch 0"
    ):
        run_ranks(2, rank_programs.compute_fails_on_rank_1, timeout_s=60)
    assert mp.active_children() == []


def test_a_hanging_rank_is_stopped() -> None:
    with pytest.raises(TimeoutError, match=r"^ranks \[0, 1\] of 2 did not finish within 3 s$"):
        run_ranks(2, rank_programs.sleep_forever, timeout_s=3)
    assert mp.active_children() == []


def test_backend_choice() -> None:
    assert pick_backend("cpu") == ("gloo", "cpu")
    with pytest.raises(ValueError, match="^device must be 'auto', 'cpu' or 'cuda', got 'npu'$"):
        pick_backend("npu")
    if torch.cuda.is_available():
        assert pick_backend("auto") == ("nccl", "cuda")
    else:
        assert pick_backend("auto") == ("gloo", "cpu")
        with pytest.raises(PlatformUnavailableError, match="device='cuda' needs a CUDA build"):
            run_ranks(2, check_outputs, W, device="cuda")


def test_tp_mlp_errors() -> None:
    with pytest.raises(ValueError, match=r"^ffn_size=130 must be a multiple of world_size=4 "):
        TensorParallelMLP(1, 8, 130, 0, 4)
    with pytest.raises(ValueError, match=r"^rank must be in \[0, world_size=2\), got 2$"):
        TensorParallelMLP(1, 8, 16, 2, 2)
    with pytest.raises(
        ValueError, match="^num_layers, hidden_size and ffn_size must be >= 1, got 0, 8, 16$"
    ):
        TensorParallelMLP(0, 8, 16)


def test_world_size_one_is_the_sum_of_shards() -> None:
    # the full-width reference equals the sum of the two shards' partial outputs
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    full = TensorParallelMLP(1, 8, 16, seed=4)
    shards = [TensorParallelMLP(1, 8, 16, r, 2, seed=4) for r in range(2)]
    _, want = full.compute(0, 0, x)
    got = sum(s.compute(0, 0, x)[1] for s in shards)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bench_prints_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    from sagellm.overlap.bench import main

    assert (
        main(["--reps", "1", "--layers", "2", "--hidden", "32", "--ffn", "64", "--tokens", "8"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith(
        "tensor-parallel MLP: 2 ranks x 1 thread(s), 2 layers, hidden 32, ffn 64, 8 tokens in "
        "2 micro-batches, 1 interleaved reps, device cpu, loadavg "
    )
    for label in (
        "compute alone", "communication alone", "serialised step", "overlapped step",
        "hidden communication", "speedup vs serialised", "idle share", "compute inflation",
    ):  # fmt: skip
        assert f"  {label} " in out
    assert mp.active_children() == []
