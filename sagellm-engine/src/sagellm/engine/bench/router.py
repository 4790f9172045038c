"""Time to first token of multi-turn chats through ``sagellm router``, policy by policy.

Starts ``--instances`` ``sagellm serve`` processes (the embedded model unless ``--model``
says otherwise, each with a prefix cache) on free ports, one ``sagellm router`` process
per policy in front of the same workers, and drives each router in turn with the same
kind of workload: ``--conversations`` chats, each opened by one of a few long system
prompts shared between conversations, each turn's prompt extending the previous turn's
(system prompt, earlier questions, the model's earlier answers, a new question). Every
turn is a streamed chat completion; TTFT is the time from sending it to the first
content delta.

Runs are interleaved (policy order reversed every round) and every run has its own
system prompts, so no run finds another run's prefixes in a worker's cache. When
``vllm-router`` or ``sglang-router`` is installed, its cache-aware policy is run on the
same workers and workload as one more contender.

Usage::

    python -m sagellm.engine.bench.router --instances 2 --conversations 32 --turns 4 \\
        --policy round_robin,cache_aware
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm.core.ports import find_free_port
from sagellm.engine.bench.serve_peers import ServerProcess

__all__ = [
    "Workload",
    "build_parser",
    "main",
    "percentile",
    "run_conversations",
    "stream_events",
    "summarize",
]

MODEL_NAME = "bench"  # the name every worker serves under

_WORDS = [
    "system",
    "policy",
    "answer",
    "request",
    "kernel",
    "cache",
    "token",
    "memory",
    "router",
    "batch",
    "latency",
    "model",
    "prefix",
    "engine",
    "queue",
    "worker",
    "stream",
    "block",
    "tensor",
    "layer",
    "schedule",
    "decode",
    "prefill",
    "vector",
    "shard",
    "replica",
    "budget",
    "metric",
    "health",
    "network",
    "context",
    "window",
    "prompt",
    "reply",
    "turn",
    "user",
]


@dataclass(frozen=True)
class Workload:
    conversations: int = 16
    turns: int = 3
    system_prompts: int = 4  # distinct system prompts, shared round-robin by the chats
    system_words: int = 300
    question_words: int = 24
    max_tokens: int = 16
    concurrency: int = 4  # conversations in flight at once


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class RunResult:
    name: str
    ttft: list[float] = field(default_factory=list)  # seconds, every turn
    ttft_later: list[float] = field(default_factory=list)  # turns after the first
    errors: int = 0
    seconds: float = 0.0
    hit_tokens: float = 0.0  # prompt tokens the workers served from their prefix caches
    prompt_tokens: float = 0.0  # prompt tokens the workers received


async def stream_events(client: Any, url: str, body: dict[str, Any]) -> AsyncIterator[Any]:
    """The JSON events of a streamed OpenAI request until ``[DONE]``; RuntimeError on a
    non-200 answer or an error event."""
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(str(event["error"]))
            yield event


async def _turn(
    client: Any, url: str, messages: list[dict[str, str]], w: Workload
) -> tuple[float, str]:
    body = {
        "model": MODEL_NAME,
        "messages": messages,
        "max_tokens": w.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    ttft = float("nan")
    parts: list[str] = []
    async for event in stream_events(client, url + "/v1/chat/completions", body):
        for choice in event.get("choices", []):
            text = (choice.get("delta") or {}).get("content")
            if text:
                if not parts:
                    ttft = time.perf_counter() - t0
                parts.append(text)
    return ttft, "".join(parts)


async def run_conversations(url: str, w: Workload, seed: int, name: str) -> RunResult:
    """Drive ``w`` through the router at ``url``; ``seed`` makes the run's own prompts."""
    import httpx

    rng = random.Random(seed)
    systems = [f"[{seed}:{i}] " + _words(rng, w.system_words) for i in range(w.system_prompts)]
    questions = [
        [_words(rng, w.question_words) + "?" for _ in range(w.turns)]
        for _ in range(w.conversations)
    ]
    result = RunResult(name)
    sem = asyncio.Semaphore(w.concurrency)

    async def conversation(client: Any, i: int) -> None:
        async with sem:
            messages = [{"role": "system", "content": systems[i % len(systems)]}]
            for t in range(w.turns):
                messages.append({"role": "user", "content": questions[i][t]})
                try:
                    ttft, reply = await _turn(client, url, messages, w)
                except Exception:  # counted, the conversation goes on
                    result.errors += 1
                    reply = ""
                    ttft = float("nan")
                if ttft == ttft:  # not NaN
                    result.ttft.append(ttft)
                    if t:
                        result.ttft_later.append(ttft)
                messages.append({"role": "assistant", "content": reply})

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=w.concurrency * 2 + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(conversation(client, i) for i in range(w.conversations)))
    result.seconds = time.perf_counter() - t0
    return result


def summarize(runs: Sequence[RunResult], baseline: str) -> dict[str, dict[str, float]]:
    """Per contender: mean, p50, p90 TTFT (ms), later turns' mean, errors, ratios."""
    by: dict[str, list[RunResult]] = {}
    for r in runs:
        by.setdefault(r.name, []).append(r)
    out: dict[str, dict[str, float]] = {}
    for name, rs in by.items():
        all_ttft = [x for r in rs for x in r.ttft]
        later = [x for r in rs for x in r.ttft_later]
        out[name] = {
            "requests": float(len(all_ttft)),
            "errors": float(sum(r.errors for r in rs)),
            "mean_ms": 1e3 * statistics.fmean(all_ttft) if all_ttft else float("nan"),
            "p50_ms": 1e3 * percentile(all_ttft, 50),
            "p90_ms": 1e3 * percentile(all_ttft, 90),
            "later_turns_mean_ms": 1e3 * statistics.fmean(later) if later else float("nan"),
            "seconds": sum(r.seconds for r in rs),
            "hit_rate": _ratio(sum(r.hit_tokens for r in rs), sum(r.prompt_tokens for r in rs)),
        }
    base = out.get(baseline)
    for stats in out.values():
        for key in ("mean_ms", "p50_ms", "p90_ms"):
            ratio = stats[key] / base[key] if base and base[key] else float("nan")
            stats[key.replace("_ms", "_ratio")] = ratio
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


_HIT = "sagellm_scheduler_num_prefix_hit_tokens_total"
_PROMPT = "sagellm_prompt_tokens_total"


def cache_counters(urls: Sequence[str]) -> tuple[float, float]:
    """(prefix-hit prompt tokens, prompt tokens) summed over the workers' /metrics (sageLLM
    workers; 0 for others)."""
    import re
    import urllib.request

    hit = prompt = 0.0
    for url in urls:
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            m = re.match(r"^(\S+?)(?:\{[^}]*\})? ([0-9.eE+-]+)$", line)
            if m and m.group(1) == _HIT:
                hit += float(m.group(2))
            elif m and m.group(1) == _PROMPT:
                prompt += float(m.group(2))
    return hit, prompt


def format_table(summary: dict[str, dict[str, float]], baseline: str) -> str:
    head = (
        f"{'contender':<24} {'n':>5} {'err':>4} {'mean ms':>9} {'p50 ms':>9} {'p90 ms':>9} "
        f"{'turn>1 ms':>10} {'hits':>6} {'mean/' + baseline:>18} {'p50/' + baseline:>18}"
    )
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        lines.append(
            f"{name:<24} {int(s['requests']):>5} {int(s['errors']):>4} {s['mean_ms']:>9.1f} "
            f"{s['p50_ms']:>9.1f} {s['p90_ms']:>9.1f} {s['later_turns_mean_ms']:>10.1f} "
            f"{s.get('hit_rate', float('nan')):>6.2f} "
            f"{s['mean_ratio']:>18.3f} {s['p50_ratio']:>18.3f}"
        )
    return "\n".join(lines)


def _peer_routers() -> list[tuple[str, list[str]]]:
    """Installed third-party routers: (name, command prefix taking --worker-urls etc.)."""
    found = []
    exe = shutil.which("vllm-router")
    if exe:
        found.append(("vllm-router", [exe]))
    if importlib.util.find_spec("sglang_router") is not None:
        found.append(("sglang-router", [sys.executable, "-m", "sglang_router.launch_router"]))
    return found


def _progress(message: str) -> None:
    print(f"[bench.router] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sagellm.engine.bench.router",
        description="TTFT of multi-turn chats through sagellm router, per routing policy.",
    )
    p.add_argument("--instances", type=int, default=2, help="sagellm serve workers")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument(
        "--policy",
        default="round_robin,cache_aware",
        help="comma-separated policies; the first is the baseline of the ratios",
    )
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions per policy")
    p.add_argument("--system-prompts", type=int, default=4, help="distinct system prompts")
    p.add_argument("--system-words", type=int, default=300, help="words per system prompt")
    p.add_argument("--question-words", type=int, default=24, help="words per user turn")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    p.add_argument("--concurrency", type=int, default=4, help="conversations at once")
    p.add_argument("--model", help="model of the workers (default: the embedded model)")
    p.add_argument(
        "--threads", type=int, help="torch threads per worker (default: CPUs / instances)"
    )
    p.add_argument(
        "--engine-args",
        default="--prefix-cache radix",
        help="more `sagellm serve` flags, one string (default: '--prefix-cache radix')",
    )
    p.add_argument(
        "--no-peers", action="store_true", help="skip vllm-router / sglang-router even if installed"
    )
    p.add_argument("--work-dir", help="folder for the logs (default: a temporary one)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    from sagellm.engine.router.policies import POLICIES

    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    w = Workload(
        conversations=args.conversations,
        turns=args.turns,
        system_prompts=args.system_prompts,
        system_words=args.system_words,
        question_words=args.question_words,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
    )
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sagellm-bench-router-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.instances)
    engine_flags = ["--served-model-name", MODEL_NAME, "--threads", str(threads)]
    if args.model:
        engine_flags += ["--model", args.model]
    engine_flags += shlex.split(args.engine_args)
    procs: list[ServerProcess] = []
    notes: list[str] = []
    try:
        urls = []
        for i in range(args.instances):
            port = find_free_port()
            cmd = [sys.executable, "-m", "sagellm.engine.cli", "serve", "--port", str(port)]
            _progress(f"starting worker {i} on port {port}")
            procs.append(
                ServerProcess(
                    f"worker-{i}",
                    cmd + engine_flags,
                    port,
                    log_path=work / f"worker-{i}.log",
                    timeout=args.startup_timeout,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        contenders: dict[str, str] = {}
        for policy in policies:
            port = find_free_port()
            cmd = [sys.executable, "-m", "sagellm.engine.cli", "router", "--port", str(port)]
            cmd += ["--policy", policy, "--health-interval", "5", "--worker-urls", *urls]
            procs.append(
                ServerProcess(f"router-{policy}", cmd, port, log_path=work / f"router-{policy}.log")
            )
            contenders[policy] = f"http://127.0.0.1:{port}"
        peers = [] if args.no_peers else _peer_routers()
        if not peers and not args.no_peers:
            notes.append("vllm-router / sglang-router not installed: compared our policies only")
        for name, prefix in peers:
            port = find_free_port()
            cmd = [*prefix, "--worker-urls", *urls, "--policy", "cache_aware"]
            cmd += ["--host", "127.0.0.1", "--port", str(port)]
            try:
                procs.append(
                    ServerProcess(name, cmd, port, log_path=work / f"{name}.log", timeout=120)
                )
                contenders[f"{name}:cache_aware"] = f"http://127.0.0.1:{port}"
            except RuntimeError as exc:
                notes.append(f"{name} did not start: {str(exc).splitlines()[0]}")
        names = list(contenders)
        _progress("warm-up")
        warm = Workload(conversations=2, turns=1, system_prompts=1, system_words=20, max_tokens=4)
        asyncio.run(run_conversations(contenders[names[0]], warm, -1, "warm"))
        runs: list[RunResult] = []
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                seed = 1000 * r + names.index(name)
                _progress(f"round {r + 1}/{args.rounds}: {name}")
                before = cache_counters(urls)
                run = asyncio.run(run_conversations(contenders[name], w, seed, name))
                after = cache_counters(urls)
                run.hit_tokens, run.prompt_tokens = after[0] - before[0], after[1] - before[1]
                runs.append(run)
        summary = summarize(runs, names[0])
        print(
            f"{args.instances} workers, {w.conversations} conversations x {w.turns} turns, "
            f"{w.system_prompts} system prompts of {w.system_words} words, "
            f"{w.max_tokens} tokens per answer, {w.concurrency} at once, {args.rounds} rounds"
        )
        print(format_table(summary, names[0]))
        for note in notes:
            print(f"note: {note}")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"workload": w.__dict__, "summary": summary, "notes": notes}, indent=2)
            )
    finally:
        for proc in reversed(procs):
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
