"""KV-management workloads on real generation, each comparison side by side in one run.

``python -m sagellm.engine.bench.kv_workloads prefix`` prints a table with ratios.

- ``prefix``: requests sharing a ~1k-token system prompt; TTFT with the prefix cache vs
  without, and whether the greedy tokens are identical.
- ``tiers``: multi-turn conversations whose working set is ~4x the device tier; TTFT of
  returning conversations with host/disk tiers vs recomputing evicted prefixes.
- ``goodput``: long-prompt and short chat requests with TTFT/TPOT SLOs through every
  installed scheduling policy vs FCFS.
- ``eviction``: prefix-cache hit ratio and TTFT per installed eviction policy on a
  multi-tenant stream whose working set exceeds the pool (chats, few-shot templates,
  one-off prompts; cost_aware with and without the lifetime predictor).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sagellm.core import registry
from sagellm.core.types import SLO, RequestOutput, SamplingParams

__all__ = [
    "RunResult",
    "run_requests",
    "bench_prefix",
    "bench_tiers",
    "bench_goodput",
    "bench_eviction",
    "main",
]


@dataclass
class RunResult:
    """What one configuration produced on one workload."""

    name: str
    tokens: list[list[int]]  # greedy output token ids per request, in input order
    ttft: list[float]  # seconds per request
    tpot: list[float]  # seconds per output token per request (0 for one-token outputs)
    wall_seconds: float
    stats: dict[str, Any]


#: Engine options every configuration of a run shares (set from the command line).
ENGINE_OPTIONS: dict[str, Any] = {}


def _engine(model: str, threads: int, **options: Any) -> Any:
    from sagellm.engine.llm import LLM

    return LLM(model=model, num_threads=threads, seed=0, **ENGINE_OPTIONS, **options).engine


@dataclass(frozen=True)
class Req:
    """One request of a workload."""

    prompt: list[int]
    max_tokens: int
    arrival: float = 0.0  # seconds after the run starts
    tenant: str = ""
    priority: int = 0
    slo: SLO | None = None  # latency objectives, given to the engine with the request


def run_requests(engine: Any, requests: Sequence[Req], name: str) -> RunResult:
    """Feed ``requests`` at their arrival times, step until done, collect per-request timing."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    outputs: dict[str, RequestOutput] = {}
    ids: list[str] = [""] * len(requests)
    start = time.perf_counter()
    start_mono = time.monotonic()  # the engine's clock
    nxt = 0
    while nxt < len(order) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while nxt < len(order) and requests[order[nxt]].arrival <= now:
            i = order[nxt]
            r = requests[i]
            sp = SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True)
            ids[i] = engine.add_request(
                f"{name}-{i}",
                r.prompt,
                sp,
                arrival_time=start_mono + r.arrival,
                tenant=r.tenant,
                priority=r.priority,
                slo=r.slo,
            )
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, requests[order[nxt]].arrival - now))
            continue
        for out in engine.step(unfinished_outputs=False):
            if out.finished:
                outputs[out.request_id] = out
    wall = time.perf_counter() - start
    res = [outputs[i] for i in ids]
    return RunResult(
        name=name,
        tokens=[list(o.outputs[0].token_ids) for o in res],
        ttft=[o.metrics.ttft or 0.0 for o in res],
        tpot=[o.metrics.tpot or 0.0 for o in res],
        wall_seconds=wall,
        stats={},
    )


def _p(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)


def _warm(engine: Any, prompt_len: int, shared_len: int = 0, rounds: int = 3) -> None:
    """Passes over the shapes the run will see, so measured requests are not cold.

    With ``shared_len`` the prompts share that many leading tokens (a prefix cache then
    warms its hit path too). The index is cleared afterwards: the run starts cold.
    """
    rng = random.Random(1)
    shared = [rng.randrange(100, 40000) for _ in range(shared_len)]
    for _ in range(rounds):
        tail = [rng.randrange(100, 40000) for _ in range(prompt_len - shared_len)]
        run_requests(engine, [Req(shared + tail, 8)], "warm")
    index = engine.parts.prefix_index
    if index is not None:
        engine.kv_pool.free(index.clear())
    engine.component_stats()  # reset counters


# ---------------------------------------------------------------------- prefix


def bench_prefix(
    model: str = "smollm2-135m",
    threads: int = 2,
    num_requests: int = 12,
    system_len: int = 1024,
    user_len: int = 32,
    output_len: int = 8,
    prefix_cache: str = "radix",
) -> str:
    """TTFT of requests sharing a system prompt, prefix cache vs none, in one run."""
    rng = random.Random(0)
    system = [rng.randrange(100, 40000) for _ in range(system_len)]
    reqs = [
        Req(system + [rng.randrange(100, 40000) for _ in range(user_len)], output_len)
        for _ in range(num_requests)
    ]
    results = []
    for name, pc in (("no cache", None), (f"prefix cache {prefix_cache}", prefix_cache)):
        opts: dict[str, Any] = {"max_model_len": 2048, "max_num_batched_tokens": 2048}
        if pc:
            opts["prefix_cache"] = pc
        engine = _engine(model, threads, **opts)
        _warm(engine, system_len + user_len, system_len)
        # Requests arrive one after another (a chat service's steady stream), so TTFT is
        # the prefill work of each request rather than queueing behind the others.
        res = RunResult("", [], [], [], 0.0, {})
        for i, r in enumerate(reqs):
            one = run_requests(engine, [r], f"{name}-{i}")
            res.tokens += one.tokens
            res.ttft += one.ttft
            res.wall_seconds += one.wall_seconds
        res.stats = engine.component_stats()
        res.name = name
        results.append(res)
        del engine
    base, cached = results
    rows = [
        [
            "config",
            "TTFT mean ms",
            "TTFT p50 ms",
            "TTFT max ms",
            "1st request ms",
            "mean of the rest ms",
            "wall s",
            "TTFT speedup (mean)",
        ]
    ]
    for res in results:
        rows.append(
            [
                res.name,
                f"{1e3 * statistics.fmean(res.ttft):.1f}",
                f"{1e3 * _p(res.ttft, 0.5):.1f}",
                f"{1e3 * max(res.ttft):.1f}",
                f"{1e3 * res.ttft[0]:.1f}",
                f"{1e3 * statistics.fmean(res.ttft[1:]):.1f}",
                f"{res.wall_seconds:.2f}",
                f"{statistics.fmean(base.ttft) / statistics.fmean(res.ttft):.2f}x",
            ]
        )
    same = sum(a == b for a, b in zip(base.tokens, cached.tokens))
    pstats = cached.stats.get("prefix_index")
    lines = [
        f"prefix workload: {num_requests} requests, {system_len}-token shared system prompt "
        f"+ {user_len} user tokens, {output_len} greedy tokens, {threads} threads",
        _table(rows),
        f"greedy tokens identical: {same}/{num_requests}",
    ]
    if pstats is not None:
        lines.append(f"prefix cache stats: {pstats}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- tiers


def bench_tiers(
    model: str = "smollm2-135m",
    threads: int = 2,
    num_conversations: int = 8,
    num_turns: int = 3,
    system_len: int = 128,
    user_len: int = 160,
    output_len: int = 4,
    device_blocks: int = 80,
    prefix_cache: str = "radix",
) -> str:
    """TTFT of returning multi-turn conversations: host/disk tiers vs recompute, one run."""
    rng = random.Random(0)
    systems = [
        [rng.randrange(100, 40000) for _ in range(system_len)] for _ in range(num_conversations)
    ]
    users = [
        [[rng.randrange(100, 40000) for _ in range(user_len)] for _ in range(num_turns)]
        for _ in range(num_conversations)
    ]
    results = []
    for label, pool in (("recompute (paged)", "paged"), ("tiers (device+host+disk)", "tiered")):
        engine = _engine(
            model,
            threads,
            kv_pool=pool,
            num_blocks=device_blocks,
            prefix_cache=prefix_cache,
            max_model_len=1024,
            max_num_batched_tokens=1024,
        )
        _warm(engine, system_len + user_len, system_len)
        history = [list(s) for s in systems]
        first: list[float] = []
        returning: list[float] = []
        tokens: list[list[int]] = []
        cached = 0
        start = time.perf_counter()
        # Round robin: every conversation comes back after all the others spoke, so its
        # blocks have left the device tier by then.
        for turn in range(num_turns):
            for c in range(num_conversations):
                prompt = history[c] + users[c][turn]
                res = run_requests(engine, [Req(prompt, output_len)], f"{label}-{turn}-{c}")
                (first if turn == 0 else returning).extend(res.ttft)
                tokens.extend(res.tokens)
                history[c] = prompt + res.tokens[0]
        wall = time.perf_counter() - start
        stats = engine.component_stats()
        pstats = stats.get("prefix_index")
        cached = pstats.num_matched_tokens if pstats is not None else 0
        results.append((label, first, returning, tokens, wall, cached, pstats))
        del engine
    base = statistics.fmean(results[0][2])
    working_set = sum(len(h) for h in history) // 16
    rows = [
        [
            "config",
            "first-turn TTFT ms",
            "returning TTFT mean ms",
            "returning p50 ms",
            "speedup (returning)",
            "prompt tokens from cache",
            "wall s",
        ]
    ]
    for label, first, ret, _, wall, cached, _ in results:
        rows.append(
            [
                label,
                f"{1e3 * statistics.fmean(first):.1f}",
                f"{1e3 * statistics.fmean(ret):.1f}",
                f"{1e3 * _p(ret, 0.5):.1f}",
                f"{base / statistics.fmean(ret):.2f}x",
                str(cached),
                f"{wall:.2f}",
            ]
        )
    same = sum(a == b for a, b in zip(results[0][3], results[1][3]))
    lines = [
        f"tiers workload: {num_conversations} conversations x {num_turns} turns, "
        f"{system_len}-token system + {user_len}-token user turns, {output_len} output tokens; "
        f"device tier {device_blocks} blocks, final working set ~{working_set} blocks "
        f"({working_set / device_blocks:.1f}x the device tier), {threads} threads",
        _table(rows),
        f"greedy outputs identical: {same}/{len(results[0][3])}",
        f"tiered prefix stats: {results[1][6]}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- goodput


def bench_goodput(
    model: str = "smollm2-135m",
    threads: int = 2,
    num_long: int = 12,
    num_short: int = 36,
    long_len: int = 768,
    short_len: int = 32,
    output_len: int = 16,
    rate: float = 6.0,
    long_slo: SLO = SLO(ttft_ms=3000.0, tpot_ms=250.0),
    short_slo: SLO = SLO(ttft_ms=1000.0, tpot_ms=250.0),
) -> str:
    """Goodput (requests meeting both SLOs per second) per installed scheduling policy.

    Long-prompt requests (document questions, summaries) have a looser TTFT objective than
    short chat requests, as in DistServe's per-application SLOs; both have TPOT 250 ms (a
    decode step with ~25 running requests takes ~100-200 ms on a 2-core CPU). Every request carries its SLO into the engine (``add_request(slo=)``),
    so SLO-aware policies see what they are measured against.
    """

    def met(slo: SLO | None, ttft: float, tpot: float) -> bool:
        if slo is None:
            return True
        return (slo.ttft_ms is None or ttft * 1000.0 <= slo.ttft_ms) and (
            slo.tpot_ms is None or tpot * 1000.0 <= slo.tpot_ms
        )

    rng = random.Random(0)
    reqs: list[Req] = []
    t = 0.0
    kinds = ["long"] * num_long + ["short"] * num_short
    rng.shuffle(kinds)
    for kind in kinds:
        t += rng.expovariate(rate)
        n = long_len if kind == "long" else short_len
        # Short chat requests carry the higher priority (lower value) and the tenant "chat".
        reqs.append(
            Req(
                [rng.randrange(100, 40000) for _ in range(n)],
                output_len,
                arrival=t,
                tenant=kind,
                priority=1 if kind == "long" else 0,
                slo=long_slo if kind == "long" else short_slo,
            )
        )
    names = sorted(p.name for p in registry.available("scheduler"))
    # FCFS runs first and again last: the baseline is the better of the two, so a policy
    # is not credited with the process warming up.
    names = ["fcfs"] + [n for n in names if n != "fcfs"] + ["fcfs"]
    results: list[tuple[str, RunResult, int]] = []
    base_tokens: list[list[int]] | None = None
    for name in names:
        try:
            engine = _engine(
                model, threads, scheduler=name, max_model_len=1024, max_num_batched_tokens=256
            )
        except Exception as exc:  # a policy that cannot be built is reported, not fatal
            print(f"{name}: cannot build: {exc}")
            continue
        _warm(engine, long_len)
        res = run_requests(engine, reqs, name)
        good = sum(met(r.slo, a, b) for r, a, b in zip(reqs, res.ttft, res.tpot))
        label = name if all(r[0] != name for r in results) else f"{name} (again)"
        results.append((label, res, good))
        if base_tokens is None:
            base_tokens = res.tokens
        del engine
    rows = [
        [
            "policy",
            "met SLOs",
            "goodput req/s",
            "vs fcfs",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "TPOT p50 ms",
            "TPOT p99 ms",
            "same tokens",
        ]
    ]
    base_goodput = max(
        (good / res.wall_seconds for n, res, good in results if n.startswith("fcfs")),
        default=0.0,
    )
    for name, res, good in results:
        gp = good / res.wall_seconds
        rows.append(
            [
                name,
                f"{good}/{len(reqs)}",
                f"{gp:.2f}",
                f"{gp / base_goodput:.2f}x" if base_goodput else "fcfs met none",
                f"{1e3 * _p(res.ttft, 0.5):.0f}",
                f"{1e3 * _p(res.ttft, 0.99):.0f}",
                f"{1e3 * _p(res.tpot, 0.5):.0f}",
                f"{1e3 * _p(res.tpot, 0.99):.0f}",
                str(res.tokens == base_tokens),
            ]
        )
    return "\n".join(
        [
            f"goodput workload: {num_long} long ({long_len} tokens, SLO TTFT <= "
            f"{long_slo.ttft_ms:.0f} ms, TPOT <= {long_slo.tpot_ms:.0f} ms) + {num_short} short "
            f"({short_len} tokens, TTFT <= {short_slo.ttft_ms:.0f} ms, TPOT <= "
            f"{short_slo.tpot_ms:.0f} ms) requests, Poisson {rate}/s, {output_len} output "
            f"tokens, {threads} threads",
            _table(rows),
        ]
    )


# ---------------------------------------------------------------------- eviction


def _eviction_workload(
    rng: random.Random,
    num_requests: int,
    num_tenants: int,
    system_len: int,
    num_templates: int,
    template_len: int,
    user_len: int,
    one_off_len: int,
    output_len: int,
) -> list[Req]:
    """A multi-tenant stream whose working set exceeds the pool (see :func:`bench_eviction`)."""

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    systems = [tokens(system_len) for _ in range(num_tenants)]
    templates = [tokens(template_len) for _ in range(num_templates)]
    popularity = [1.0 / (k + 1) for k in range(num_tenants)]  # Zipf, exponent 1
    history: dict[int, list[int]] = {}
    reqs: list[Req] = []
    for _ in range(num_requests):
        kind = rng.choices(("chat", "few_shot", "one_off"), (0.55, 0.25, 0.2))[0]
        k = rng.choices(range(num_tenants), popularity)[0]
        if kind == "one_off":
            prompt = tokens(one_off_len)  # never seen again: pollutes a recency-only cache
        elif kind == "few_shot":
            j = rng.choices(range(num_templates), popularity[:num_templates])[0]
            prompt = systems[k] + templates[j] + tokens(user_len)
        else:
            # the tenant's conversation returns with one more user turn; long ones restart
            ctx = history.get(k)
            if ctx is None or len(ctx) + user_len > 4 * system_len:
                ctx = list(systems[k])
            prompt = history[k] = ctx + tokens(user_len)
        reqs.append(Req(prompt, output_len, tenant=f"t{k}"))
    return reqs


def bench_eviction(
    model: str = "smollm2-135m",
    threads: int = 2,
    num_requests: int = 64,
    num_tenants: int = 8,
    system_len: int = 192,
    num_templates: int = 4,
    template_len: int = 256,
    user_len: int = 24,
    one_off_len: int = 320,
    output_len: int = 2,
    num_blocks: int = 96,
    prefix_cache: str = "radix",
) -> str:
    """Prefix-cache hit ratio and TTFT per installed eviction policy, one run.

    Tenants' system prompts (Zipf-popular), their multi-turn chats, few-shot templates
    behind the system prompts and one-off prompts come one after another; the working
    set is several times the device pool, so the index evicts all along. Requests run one
    at a time, so every policy sees the same sequence of cache operations.
    Rows: no prefix cache (the reference for tokens and TTFT), the index's built-in LRU,
    every installed policy, and ``cost_aware`` with the first installed lifetime predictor.
    """
    rng = random.Random(0)
    reqs = _eviction_workload(
        rng,
        num_requests,
        num_tenants,
        system_len,
        num_templates,
        template_len,
        user_len,
        one_off_len,
        output_len,
    )
    bs = 16  # the engine's default block size
    max_len = max(len(r.prompt) for r in reqs) + output_len
    working_set = len(
        {tuple(r.prompt[:end]) for r in reqs for end in range(bs, len(r.prompt) + 1, bs)}
    )
    configs: list[tuple[str, dict[str, Any]]] = [
        ("no prefix cache", {}),
        ("built-in LRU", {"prefix_cache": prefix_cache}),
    ]
    for name in sorted(p.name for p in registry.available("eviction")):
        configs.append((name, {"prefix_cache": prefix_cache, "eviction": name}))
        if name == "cost_aware":
            for life in sorted(p.name for p in registry.available("lifetime"))[:1]:
                configs.append(
                    (
                        f"{name} + {life}",
                        {"prefix_cache": prefix_cache, "eviction": name, "lifetime": life},
                    )
                )
    header = [
        "eviction",
        "hit ratio (tokens)",
        "vs built-in LRU",
        "hits/lookups",
        "evicted blocks",
        "TTFT mean ms",
        "TTFT vs no cache",
        "same tokens",
    ]
    rows = [header]
    base: RunResult | None = None
    lru_ratio: float | None = None
    for label, opts in configs:
        try:
            engine = _engine(
                model,
                threads,
                num_blocks=num_blocks,
                max_model_len=max_len,
                max_num_seqs=1,
                **opts,
            )
        except Exception as exc:  # a policy that cannot be built is reported, not fatal
            print(f"{label}: cannot build: {exc}")
            continue
        _warm(engine, one_off_len)
        # One request at a time, as a client that sends the next one when the answer is
        # back: TTFT is the prefill work a policy saves, not queueing.
        res = RunResult(label, [], [], [], 0.0, {})
        for i, r in enumerate(reqs):
            one = run_requests(engine, [Req(r.prompt, r.max_tokens, tenant=r.tenant)], f"e{i}")
            res.tokens += one.tokens
            res.ttft += one.ttft
            res.wall_seconds += one.wall_seconds
        ttft = statistics.fmean(res.ttft)
        if base is None:
            base = res
        st = engine.component_stats().get("prefix_index")
        if st is None:
            ratio_s, vs_lru, hits, evicted = "-", "-", "-", "-"
        else:
            ratio = st.num_matched_tokens / max(1, st.num_query_tokens)
            if lru_ratio is None:
                lru_ratio = ratio
            ratio_s = f"{ratio:.3f}"
            vs_lru = f"{ratio / lru_ratio:.2f}x" if lru_ratio else "-"
            hits = f"{st.num_hits}/{st.num_lookups}"
            evicted = str(st.num_evicted_blocks)
        same = sum(a == b for a, b in zip(res.tokens, base.tokens))
        rows.append(
            [
                label,
                ratio_s,
                vs_lru,
                hits,
                evicted,
                f"{1e3 * ttft:.0f}",
                f"{statistics.fmean(base.ttft) / ttft:.2f}x",
                f"{same}/{len(reqs)}",
            ]
        )
        del engine
    return "\n".join(
        [
            f"eviction workload: {num_requests} requests one at a time ({num_tenants} tenants, "
            f"Zipf; {system_len}-token system prompts; chats, few-shot on {num_templates} "
            f"{template_len}-token templates, {one_off_len}-token one-offs), {output_len} "
            f"greedy tokens; device pool {num_blocks} blocks, working set {working_set} "
            f"blocks; {threads} threads",
            _table(rows),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sagellm.engine.bench.kv_workloads")
    parser.add_argument("workload", choices=["prefix", "tiers", "goodput", "eviction"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None)
    args = parser.parse_args(argv)
    if args.dtype:
        ENGINE_OPTIONS["dtype"] = args.dtype
    fn: dict[str, Callable[..., str]] = {
        "prefix": bench_prefix,
        "tiers": bench_tiers,
        "goodput": bench_goodput,
        "eviction": bench_eviction,
    }
    print(fn[args.workload](model=args.model, threads=args.threads))


if __name__ == "__main__":
    main()
