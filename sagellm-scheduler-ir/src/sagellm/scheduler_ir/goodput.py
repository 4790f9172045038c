"""Goodput of every policy on a seeded mixed workload, against a step-cost model.

A step that computes ``n`` tokens takes ``a + b * n`` seconds of simulated time (defaults
measured on the engine's CPU path: a = 15 ms, b = 1.5 ms per token for prefill-heavy
steps). The workload mixes long-prompt requests with short chat requests, each with TTFT
and TPOT objectives; goodput is the number of requests that meet both, per second of
simulated time. Every policy replays the same workload in one run; ratios are to FCFS.

Run ``python -m sagellm.scheduler_ir.goodput`` for the table (``--help`` for options).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sagellm.core import registry
from sagellm.core.types import SLO, FinishReason, GenerationRequest
from sagellm.scheduler_ir.sim import BlockLedger

__all__ = [
    "POLICY_OPTIONS",
    "PolicyResult",
    "SimRequest",
    "make_workload",
    "measure_build",
    "replay",
    "compare",
    "main",
]

# Options each policy runs with in the comparison (shared budgets come from ``compare``).
POLICY_OPTIONS: dict[str, dict[str, Any]] = {
    "fcfs": {},
    "priority": {"max_victim_computed_tokens": 256},
    "fair": {"weights": {"chat": 4.0, "batch": 1.0}, "quantum": 256},
    "slo": {},
    "adaptive": {},
    "pd": {"prefill_token_budget": 256, "decode_token_budget": 256},
}


@dataclass(frozen=True, slots=True)
class SimRequest:
    """A request of the workload: when it arrives and how many tokens it generates."""

    request: GenerationRequest
    num_output_tokens: int


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """Outcome of one replay."""

    policy: str
    num_requests: int
    num_good: int  # met both TTFT and TPOT objectives
    num_rejected: int
    makespan_s: float  # first arrival to last finish, simulated seconds
    mean_ttft_s: float

    @property
    def goodput(self) -> float:
        """Requests meeting both objectives per simulated second."""
        return self.num_good / self.makespan_s if self.makespan_s > 0 else 0.0


def make_workload(
    num_requests: int = 200,
    *,
    seed: int = 0,
    rate: float = 1.0,
    long_fraction: float = 0.15,
    long_prompt: tuple[int, int] = (1024, 3072),
    chat_prompt: tuple[int, int] = (32, 192),
    long_output: tuple[int, int] = (32, 96),
    chat_output: tuple[int, int] = (16, 96),
    long_slo: SLO = SLO(ttft_ms=12000, tpot_ms=400),
    chat_slo: SLO = SLO(ttft_ms=1500, tpot_ms=120),
) -> list[SimRequest]:
    """Poisson arrivals (``rate`` per second) of long-prompt and chat requests.

    Chat requests have priority 0 and tenant ``chat``; long ones priority 1 and tenant
    ``batch``.
    """
    rng = random.Random(seed)
    t = 0.0
    out: list[SimRequest] = []
    for i in range(num_requests):
        t += rng.expovariate(rate)
        is_long = rng.random() < long_fraction
        n_prompt = rng.randint(*(long_prompt if is_long else chat_prompt))
        n_out = rng.randint(*(long_output if is_long else chat_output))
        prompt = tuple(rng.randrange(1, 30000) for _ in range(n_prompt))
        req = GenerationRequest(
            request_id=f"{'long' if is_long else 'chat'}-{i}",
            prompt_token_ids=prompt,
            arrival_time=t,
            priority=1 if is_long else 0,
            tenant="batch" if is_long else "chat",
            slo=long_slo if is_long else chat_slo,
        )
        out.append(SimRequest(req, n_out))
    return out


def replay(
    policy: str,
    workload: Sequence[SimRequest],
    *,
    a: float = 0.015,
    b: float = 0.0015,
    options: Mapping[str, Any] | None = None,
    num_blocks: int = 2048,
    block_size: int = 16,
    max_model_len: int = 4096,
    max_steps: int = 200_000,
) -> PolicyResult:
    """Run ``workload`` through the policy named ``policy`` on simulated time."""
    now = 0.0
    pool = BlockLedger(num_blocks=num_blocks, block_size=block_size)
    context: dict[str, Any] = {"kv_pool": pool, "max_model_len": max_model_len}
    if policy in ("slo", "adaptive"):
        context["clock"] = lambda: now
    sched = registry.load("scheduler", policy, dict(options or {}), **context)
    observe = getattr(sched, "observe_step", None)
    pending = sorted(workload, key=lambda r: r.request.arrival_time)
    by_id = {r.request.request_id: r for r in pending}
    first: dict[str, float] = {}
    generated: dict[str, int] = {}
    done: dict[str, float] = {}
    rejected: set[str] = set()
    k = 0
    for _ in range(max_steps):
        while k < len(pending) and pending[k].request.arrival_time <= now:
            sched.add_request(pending[k].request)
            k += 1
        if not sched.has_unfinished_requests():
            if k == len(pending):
                break
            now = pending[k].request.arrival_time
            continue
        out = sched.schedule()
        rejected.update(out.rejected_request_ids)
        seconds = a + b * out.num_scheduled_tokens if out.chunks else 0.0
        if not out.chunks and k < len(pending):
            now = max(now, pending[k].request.arrival_time)  # idle until the next arrival
        now += seconds
        sampled = {c.request_id: [1] for c in out.chunks if c.sample}
        sched.update_from_output(out, sampled)
        if observe is not None and out.chunks:
            observe(out.num_scheduled_tokens, seconds)
        finished = []
        for rid in sampled:
            first.setdefault(rid, now)
            generated[rid] = generated.get(rid, 0) + 1
            if generated[rid] >= by_id[rid].num_output_tokens:
                done[rid] = now
                finished.append(rid)
        if finished:
            sched.finish_requests(finished, FinishReason.LENGTH)
        if out.rejected_request_ids:
            sched.finish_requests(list(out.rejected_request_ids), FinishReason.REJECTED)
    else:
        raise RuntimeError(f"policy {policy!r} did not finish the workload in {max_steps} steps")
    good = 0
    ttfts = []
    for rid, t_done in done.items():
        r = by_id[rid]
        ttft = first[rid] - r.request.arrival_time
        ttfts.append(ttft)
        n = r.num_output_tokens
        tpot = (t_done - first[rid]) / (n - 1) if n > 1 else 0.0
        slo = r.request.slo
        if (slo.ttft_ms is None or ttft * 1000 <= slo.ttft_ms) and (
            slo.tpot_ms is None or tpot * 1000 <= slo.tpot_ms
        ):
            good += 1
    start = pending[0].request.arrival_time if pending else 0.0
    return PolicyResult(
        policy=policy,
        num_requests=len(pending),
        num_good=good,
        num_rejected=len(rejected),
        makespan_s=now - start,
        mean_ttft_s=sum(ttfts) / len(ttfts) if ttfts else 0.0,
    )


def compare(
    workload: Sequence[SimRequest],
    *,
    policies: Sequence[str] = tuple(POLICY_OPTIONS),
    a: float = 0.015,
    b: float = 0.0015,
    max_num_batched_tokens: int = 512,
    max_num_seqs: int = 32,
    **kwargs: Any,
) -> dict[str, PolicyResult]:
    """Replay ``workload`` through each policy with the same budgets."""
    out = {}
    for name in policies:
        opts = {
            "max_num_batched_tokens": max_num_batched_tokens,
            "max_num_seqs": max_num_seqs,
            **POLICY_OPTIONS.get(name, {}),
        }
        out[name] = replay(name, workload, a=a, b=b, options=opts, **kwargs)
    return out


def measure_build(
    num_requests: int = 256, repeats: int = 30, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Median microseconds of ``schedule()`` and ``build_plan()`` per policy, for the first
    (prefill) step and a steady decode step of ``num_requests`` requests."""
    import statistics
    import time

    from sagellm.scheduler_ir.bench import make_workload as bench_workload

    block_size = 16
    num_blocks = num_requests * (512 + 64) // block_size + 16
    out: dict[str, dict[str, float]] = {}
    for name in POLICY_OPTIONS:
        opts: dict[str, Any] = {
            "max_num_seqs": num_requests,
            "max_num_batched_tokens": num_requests * 512,
            **POLICY_OPTIONS[name],
        }
        if name == "pd":
            opts.update(
                prefill_token_budget=num_requests * 512,
                decode_token_budget=num_requests,
                max_num_prefill_seqs=num_requests,
                max_num_decode_seqs=num_requests,
            )
        figures: dict[str, float] = {}
        reqs = bench_workload(num_requests, seed)
        for phase in ("prefill", "decode"):
            sched_us, build_us = [], []
            for _ in range(repeats if phase == "decode" else max(3, repeats // 5)):
                pool = BlockLedger(num_blocks=num_blocks, block_size=block_size)
                sched = registry.load("scheduler", name, opts, kv_pool=pool, max_model_len=8192)
                for r in reqs:
                    sched.add_request(r)
                if phase == "decode":
                    o = sched.schedule()
                    sched.update_from_output(o, {c.request_id: [1] for c in o.chunks})
                t0 = time.perf_counter()
                o = sched.schedule()
                t1 = time.perf_counter()
                sched.build_plan(o)
                t2 = time.perf_counter()
                sched_us.append((t1 - t0) * 1e6)
                build_us.append((t2 - t1) * 1e6)
            figures[f"{phase}_schedule_us"] = statistics.median(sched_us)
            figures[f"{phase}_build_us"] = statistics.median(build_us)
        out[name] = figures
    return out


def format_table(results: Mapping[str, PolicyResult]) -> str:
    base = results.get("fcfs")
    lines = [
        "| policy | good / total | goodput (req/s) | vs fcfs | mean TTFT (s) | makespan (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = r.goodput / base.goodput if base and base.goodput else float("nan")
        lines.append(
            f"| {name} | {r.num_good}/{r.num_requests} | {r.goodput:.3f} | {ratio:.2f}x "
            f"| {r.mean_ttft_s:.2f} | {r.makespan_s:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=1.0, help="arrivals per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--a", type=float, default=0.015, help="seconds per step")
    p.add_argument("--b", type=float, default=0.0015, help="seconds per token")
    p.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens")
    p.add_argument("--seqs", type=int, default=32, help="max_num_seqs")
    p.add_argument(
        "--build",
        type=int,
        default=256,
        help="also time schedule/build_plan for N requests (0: skip)",
    )
    args = p.parse_args(argv)
    wl = make_workload(args.requests, seed=args.seed, rate=args.rate)
    res = compare(
        wl, a=args.a, b=args.b, max_num_batched_tokens=args.budget, max_num_seqs=args.seqs
    )
    print(format_table(res))
    if args.build:
        print()
        print(f"{args.build} requests: median microseconds per call")
        print(
            "| policy | prefill schedule | prefill build_plan | decode schedule | decode build_plan |"
        )
        print("|---|---|---|---|---|")
        for name, f in measure_build(args.build).items():
            print(
                f"| {name} | {f['prefill_schedule_us']:.0f} | {f['prefill_build_us']:.0f} "
                f"| {f['decode_schedule_us']:.0f} | {f['decode_build_us']:.0f} |"
            )


if __name__ == "__main__":
    main()
