"""Scheduling and IR-build time for many requests, against a naive baseline.

``python -m sagellm.scheduler_ir.bench`` prints, for 256 requests in steady-state decode
(and in their first, prefill-heavy step), the time of ``schedule()`` and of
``build_plan()`` for :class:`FCFSScheduler` and for :class:`NaiveScheduler`, which
rescans every request and rebuilds every block table from scratch each step, and the
ratio between them. Both run in the same process on the same seeded workload.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence

from sagellm.core.types import (
    ExecutionPlan,
    FinishReason,
    GenerationRequest,
    IRGraph,
    IRNode,
    IRNodeKind,
    ScheduledChunk,
    SchedulerOutput,
    SequenceChunk,
)
from sagellm.scheduler_ir.config import FCFSSchedulerConfig
from sagellm.scheduler_ir.fcfs import FCFSScheduler
from sagellm.scheduler_ir.sim import BlockLedger

__all__ = ["NaiveScheduler", "main", "make_workload", "measure"]


def make_workload(num_requests: int = 256, seed: int = 0) -> list[GenerationRequest]:
    """Seeded prompts of 32-512 tokens."""
    rng = random.Random(seed)
    return [
        GenerationRequest(
            request_id=f"r{i}",
            prompt_token_ids=tuple(rng.randrange(50_000) for _ in range(rng.randint(32, 512))),
        )
        for i in range(num_requests)
    ]


class NaiveScheduler:
    """Baseline: each step rescans all requests and rebuilds block tables by scanning flags."""

    def __init__(self, pool_blocks: int, block_size: int, budget: int, max_num_seqs: int) -> None:
        self.block_size = block_size
        self.budget = budget
        self.max_num_seqs = max_num_seqs
        self.used = [False] * pool_blocks
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.tables: dict[str, list[int]] = {}
        self.order: list[str] = []
        self.step_id = 0

    def add_request(self, request: GenerationRequest) -> None:
        rid = request.request_id
        self.tokens[rid] = list(request.prompt_token_ids)
        self.computed[rid] = 0
        self.tables[rid] = []
        self.order.append(rid)

    def schedule(self) -> SchedulerOutput:
        budget = self.budget
        chunks = []
        # rebuild: release every table, then allocate all again by scanning for free flags
        for rid in self.order:
            for b in self.tables[rid]:
                self.used[b] = False
            self.tables[rid] = []
        for rid in sorted(self.order, key=self.order.index)[: self.max_num_seqs]:
            toks = self.tokens[rid]
            start = self.computed[rid]
            n = min(len(toks) - start, budget)
            need = -(-(start + max(n, 0)) // self.block_size)
            table = []
            for _ in range(need):
                b = self.used.index(False)
                self.used[b] = True
                table.append(b)
            self.tables[rid] = table
            if n <= 0:
                continue
            chunks.append(
                ScheduledChunk(
                    rid,
                    tuple(toks[start : start + n]),
                    start,
                    tuple(table),
                    start + n == len(toks),
                    start < len(toks) - 1,
                )
            )
            budget -= n
        self.step_id += 1
        return SchedulerOutput(self.step_id, tuple(chunks), self.budget - budget)

    def build_plan(self, output: SchedulerOutput) -> ExecutionPlan:
        nodes = []
        for i, c in enumerate(output.chunks):  # one node per request, then a sample node
            kind = IRNodeKind.PREFILL_CHUNK if c.is_prefill else IRNodeKind.DECODE_BATCH
            seq = SequenceChunk(
                c.request_id, c.token_ids, c.num_computed_tokens, c.block_ids, c.sample
            )
            nodes.append(IRNode(node_id=i, kind=kind, chunks=(seq,)))
        nodes.append(
            IRNode(node_id=len(nodes), kind=IRNodeKind.SAMPLE, inputs=tuple(range(len(nodes))))
        )
        return ExecutionPlan(
            output.step_id, IRGraph(tuple(nodes)), tuple(c.request_id for c in output.chunks)
        )

    def update_from_output(
        self, output: SchedulerOutput, sampled: Mapping[str, Sequence[int]]
    ) -> None:
        for c in output.chunks:
            self.computed[c.request_id] = c.num_computed_tokens + len(c.token_ids)
            if c.sample:
                self.tokens[c.request_id].extend(sampled[c.request_id])

    def finish_requests(self, ids: Iterable[str], reason: FinishReason) -> None:
        for rid in ids:
            self.order.remove(rid)


def _fcfs(num_blocks: int, block_size: int, budget: int, seqs: int) -> FCFSScheduler:
    cfg = FCFSSchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget)
    return FCFSScheduler(cfg, kv_pool=BlockLedger(num_blocks, block_size), max_model_len=8192)


def measure(num_requests: int = 256, repeats: int = 30, seed: int = 0) -> dict[str, float]:
    """Median microseconds per call of schedule() and build_plan(), both schedulers."""
    block_size, budget = 16, 256 * 512
    blocks = num_requests * (512 + 64) // block_size + 16
    results: dict[str, float] = {}
    for name, make in (
        ("fcfs", lambda: _fcfs(blocks, block_size, budget, num_requests)),
        ("naive", lambda: NaiveScheduler(blocks, block_size, budget, num_requests)),
    ):
        sched = make()
        for r in make_workload(num_requests, seed):
            sched.add_request(r)
        t0 = time.perf_counter_ns()
        out = sched.schedule()
        t1 = time.perf_counter_ns()
        sched.build_plan(out)
        t2 = time.perf_counter_ns()
        results[f"{name}_prefill_schedule_us"] = (t1 - t0) / 1e3
        results[f"{name}_prefill_build_us"] = (t2 - t1) / 1e3
        sched.update_from_output(out, {c.request_id: [1] for c in out.chunks if c.sample})
        sch, bld = [], []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            out = sched.schedule()
            t1 = time.perf_counter_ns()
            sched.build_plan(out)
            t2 = time.perf_counter_ns()
            sch.append(t1 - t0)
            bld.append(t2 - t1)
            sched.update_from_output(out, {c.request_id: [1] for c in out.chunks if c.sample})
        results[f"{name}_decode_schedule_us"] = statistics.median(sch) / 1e3
        results[f"{name}_decode_build_us"] = statistics.median(bld) / 1e3
    for phase in ("prefill", "decode"):
        for what in ("schedule", "build"):
            results[f"{phase}_{what}_speedup"] = (
                results[f"naive_{phase}_{what}_us"] / results[f"fcfs_{phase}_{what}_us"]
            )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    r = measure(args.requests, args.repeats)
    print(f"{args.requests} requests (seeded), microseconds per call, median of {args.repeats}")
    print(f"{'phase':8} {'call':10} {'fcfs':>10} {'naive':>10} {'speedup':>8}")
    for phase in ("prefill", "decode"):
        for what in ("schedule", "build"):
            print(
                f"{phase:8} {what:10} {r[f'fcfs_{phase}_{what}_us']:10.1f} "
                f"{r[f'naive_{phase}_{what}_us']:10.1f} {r[f'{phase}_{what}_speedup']:7.2f}x"
            )


if __name__ == "__main__":
    main()
