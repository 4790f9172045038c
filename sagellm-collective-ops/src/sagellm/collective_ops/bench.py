"""Figures of sagellm.collective_ops: ``python -m sagellm.collective_ops.bench``.

On ``--world-size`` local ranks (one torch thread each), for each message size: the
shared-memory exchange (every rank sends ``n`` bytes to the next through the same
segment: the copy ceiling), ``shm_flat`` and ``shm_direct`` all-reduce, the
all-gather, and gloo's all-reduce and all-gather, timed per call, interleaved, median
and p99 of rank 0. Bus bandwidth as nccl-tests defines it: all-reduce
``S/t * 2(W-1)/W``, all-gather ``S/t * (W-1)/W`` (``S`` the output), exchange ``n/t``;
each collective's bus bandwidth is divided by the exchange's at the bytes one rank
receives. Also prints the load average and the cost model calibrated in the run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from sagellm.collective_ops.launch import run_ranks

__all__ = ["bench_rank", "main", "parse_size", "run_sizes"]


def parse_size(text: str) -> int:
    """``"4K"`` -> 4096, ``"1M"`` -> 1048576, ``"16"`` -> 16."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    if not number.isdigit():
        raise ValueError(f"not a size: {text!r} (use e.g. 16, 4K, 1M)")
    return int(number) * scale


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(median, p99, best) of per-call seconds."""
    s = sorted(xs)
    return statistics.median(s), s[min(len(s) - 1, int(0.99 * len(s)))], s[0]


def run_sizes(backend: Any, sizes: list[int], iters: int, gloo_max: int) -> dict[str, Any]:
    """On every rank: time each variant per size; returns rank 0's figures."""
    w = backend.world_size
    model = backend.calibrate()
    out: dict[str, Any] = {"model": model, "rows": []}
    shm = backend._shm
    for size in sizes:
        n = max(1, size // 4)
        x = torch.zeros(n)  # sums of zeros stay finite over any number of calls
        scratch = torch.empty(n)
        gathered = torch.empty(w * n)
        variants: dict[str, Callable[[], Any]] = {
            "exchange": partial(shm.exchange, scratch, x),
            "shm_flat": partial(shm.all_reduce, x, "sum", "shm_flat"),
            "shm_direct": partial(shm.all_reduce, x, "sum", "shm_direct"),
            "all_gather": partial(shm.all_gather, gathered, x),
            # what a caller gets: validation, the cached cost-table choice, counters
            "backend": partial(backend.all_reduce, x),
        }
        if size <= gloo_max:
            variants["gloo"] = partial(dist.all_reduce, x, op=dist.ReduceOp.SUM)
            variants["gloo_all_gather"] = partial(dist.all_gather_single, gathered, x)
        reps = iters if size <= (1 << 20) else max(5, iters // 10)
        if "gloo" in variants and size > (64 << 10):
            reps = max(5, reps // 4)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():
            fn()  # warm-up (pages of the segment faulted in)
        for _ in range(reps):
            for name, fn in variants.items():  # interleaved: A B C A B C ...
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        row: dict[str, Any] = {"bytes": n * 4, "chosen": backend.choose("all_reduce", x)}
        for name, ts in times.items():
            row[name] = _quantiles(ts)
        out["rows"].append(row)
    return out


def bench_rank(backend: Any, sizes: list[int], iters: int, gloo_max: int) -> dict[str, Any]:
    """:func:`run_sizes` as a rank program (``run_ranks(w, bench_rank, sizes, ...)``)."""
    return run_sizes(backend, sizes, iters, gloo_max)


def _fmt_bw(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sizes", default="16,256,4K,64K,1M,4M,16M")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--gloo-max", default="4M", help="largest size gloo is timed at")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    w = args.world_size
    load0 = os.getloadavg()
    results = run_ranks(w, bench_rank, sizes, args.iters, parse_size(args.gloo_max), timeout_s=1800)
    load1 = os.getloadavg()
    r0 = results[0]
    m = r0["model"]
    print(f"world size {w}, one torch thread per rank, {os.cpu_count()} CPUs")
    print(
        f"load average before {' '.join(f'{v:.2f}' for v in load0)}, after {' '.join(f'{v:.2f}' for v in load1)}"
    )
    print(
        f"calibrated cost model: step {m.step_us:.1f} us, memory {m.mem_gbps:.1f} GB/s, "
        f"gloo alpha {m.torch_alpha_us:.0f} us, beta {m.torch_beta_gbps:.2f} GB/s"
    )
    bus = 2 * (w - 1) / w
    print(
        "\nall_reduce: us per call (median / best), busbw GB/s from the median, ratio = busbw /"
        " exchange busbw (median; best)\n"
        f"{'bytes':>9} {'exchange':>13} {'shm_flat':>13} {'shm_direct':>13} {'busbw':>6} "
        f"{'ratio':>5} {'best':>5} {'chosen':>10} {'all_reduce()':>13} {'gloo':>13} {'gloo bw':>7}"
    )

    def pair(q: tuple[float, float, float]) -> str:
        return f"{q[0] * 1e6:>6.1f}/{q[2] * 1e6:<6.1f}"

    for row in r0["rows"]:
        s = row["bytes"]
        ex = row["exchange"]
        best = min(("shm_flat", "shm_direct"), key=lambda k: row[k][0])
        fastest = min(("shm_flat", "shm_direct"), key=lambda k: row[k][2])
        bw = _fmt_bw(s, row[best][0]) * bus
        ratio = bw / _fmt_bw(s, ex[0])
        ratio_best = _fmt_bw(s, row[fastest][2]) * bus / _fmt_bw(s, ex[2])
        gloo = row.get("gloo")
        print(
            f"{s:>9} {pair(ex)} {pair(row['shm_flat'])} {pair(row['shm_direct'])} {bw:>6.2f} "
            f"{ratio:>5.0%} {ratio_best:>5.0%} {row['chosen']:>10} {pair(row['backend'])} "
            + (f"{pair(gloo)} {_fmt_bw(s, gloo[0]) * bus:>7.2f}" if gloo else f"{'-':>13} {'-':>7}")
        )
    print(
        "\nall_gather (S = output bytes = W x per-rank bytes): us per call (median / best)\n"
        f"{'S':>9} {'shm':>13} {'busbw':>6} {'ratio':>5} {'best':>5} {'gloo':>13} {'gloo bw':>7}"
    )
    for row in r0["rows"]:
        s = row["bytes"] * w
        q = row["all_gather"]
        bw = _fmt_bw(s, q[0]) * (w - 1) / w
        ex = row["exchange"]
        ratio = bw / _fmt_bw(row["bytes"], ex[0])
        ratio_best = _fmt_bw(s, q[2]) * (w - 1) / w / _fmt_bw(row["bytes"], ex[2])
        gloo = row.get("gloo_all_gather")
        print(
            f"{s:>9} {pair(q)} {bw:>6.2f} {ratio:>5.0%} {ratio_best:>5.0%} "
            + (
                f"{pair(gloo)} {_fmt_bw(s, gloo[0]) * (w - 1) / w:>7.2f}"
                if gloo
                else f"{'-':>13} {'-':>7}"
            )
        )


if __name__ == "__main__":
    main()
