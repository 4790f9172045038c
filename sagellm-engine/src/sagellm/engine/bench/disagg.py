"""Prefill/decode disaggregation against one instance: TTFT, the transfer's share, tokens.

Starts three ``sagellm serve`` processes on free ports: a kv_producer (prefill) and the
kv_consumer paired with it, each with ``--pd-threads`` torch threads, and one standalone
instance with ``--threads``; then a ``sagellm router`` process with the pair behind it
(``--prefill``/``--decode``). Each round sends the same ``--requests`` streamed
completions (``--prompt-words`` of words, ``--max-tokens`` greedy tokens, ``--concurrency``
at once) once to the standalone instance and once through the router, interleaved and in
alternating order, and measures TTFT (first streamed text) and the time between tokens
at the client.

From the consumer's ``/metrics`` it reads the loads' own wall time and bytes, so the
transfer's share of TTFT is measured, not inferred. With ``--dtype float32`` the texts of
the two paths must be identical (greedy): the report counts the requests that are.

Usage::

    python -m sagellm.engine.bench.disagg --requests 16 --rounds 3 --dtype float32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm.core.ports import find_free_port
from sagellm.engine.bench.router import percentile, stream_events
from sagellm.engine.bench.serve_peers import ServerProcess

__all__ = ["build_parser", "main", "metric_sum"]

MODEL_NAME = "bench"

_WORDS = [
    "prefill",
    "decode",
    "cache",
    "block",
    "token",
    "layer",
    "attention",
    "memory",
    "transfer",
    "instance",
    "channel",
    "router",
    "request",
    "batch",
    "kernel",
    "latency",
    "budget",
    "schedule",
    "prompt",
    "output",
    "value",
    "key",
    "head",
]


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of ``name`` in a Prometheus text exposition (0 when absent)."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+|NaN)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m and m.group(1) != "NaN":
            total += float(m.group(1))
    return total


@dataclass
class Run:
    name: str
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)  # seconds between streamed chunks
    texts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(n)]


async def _one(
    client: Any, url: str, prompt: str, max_tokens: int
) -> tuple[float, list[float], str]:
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    async for event in stream_events(client, url + "/v1/completions", body):
        for choice in event.get("choices", []):
            if choice.get("text"):
                stamps.append(time.perf_counter())
                parts.append(choice["text"])
    if not stamps:
        raise RuntimeError("no text streamed")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - t0, gaps, "".join(parts)


async def drive(
    url: str, name: str, texts: Sequence[str], max_tokens: int, concurrency: int
) -> Run:
    import httpx

    run = Run(name, texts=[""] * len(texts))
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:

        async def go(i: int) -> None:
            async with sem:
                try:
                    ttft, gaps, text = await _one(client, url, texts[i], max_tokens)
                except Exception as exc:  # reported, not fatal: the table shows errors
                    run.errors.append(str(exc))
                    return
                run.ttft.append(ttft)
                run.itl.extend(gaps)
                run.texts[i] = text

        await asyncio.gather(*(go(i) for i in range(len(texts))))
    return run


def _metrics(url: str) -> str:
    import httpx

    return httpx.get(url + "/metrics", timeout=10, trust_env=False).text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sagellm.engine.bench.disagg",
        description="Disaggregated prefill/decode (router + kv_producer + kv_consumer) "
        "against one instance: TTFT, inter-token latency, the KV transfer's share of TTFT, "
        "identical greedy texts.",
    )
    p.add_argument("--requests", type=int, default=16, help="completions per run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs of each path")
    p.add_argument("--prompt-words", type=int, default=400, help="words per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--model", help="model (default: the embedded model)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="compute dtype of every instance (auto: bf16 where native)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads of the one instance")
    p.add_argument("--pd-threads", type=int, default=1, help="torch threads of P and of D")
    p.add_argument("--connector", default="torch", help="kv_connector (default: torch)")
    p.add_argument("--engine-args", default="", help="more `sagellm serve` flags, one string")
    p.add_argument("--work-dir", help="folder for the logs (default: a temporary one)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    return p


def _serve(
    name: str, work: Path, threads: int, flags: list[str], timeout: float
) -> tuple[ServerProcess, str]:
    port = find_free_port()
    cmd = [sys.executable, "-m", "sagellm.engine.cli", "serve", "--port", str(port)]
    cmd += ["--threads", str(threads), *flags]
    print(f"[disagg] starting {name} on port {port}", file=sys.stderr, flush=True)
    proc = ServerProcess(name, cmd, port, log_path=work / f"{name}.log", timeout=timeout)
    return proc, f"http://127.0.0.1:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sagellm-bench-disagg-"))
    work.mkdir(parents=True, exist_ok=True)
    flags = ["--served-model-name", MODEL_NAME, "--dtype", args.dtype]
    if args.model:
        flags += ["--model", args.model]
    flags += shlex.split(args.engine_args)
    kv_port = find_free_port()
    producer = {"kv_connector": args.connector, "kv_role": "kv_producer", "kv_port": kv_port}
    consumer = {**producer, "kv_role": "kv_consumer", "kv_ip": "127.0.0.1"}
    procs: list[ServerProcess] = []
    try:
        p_proc, p_url = _serve(
            "prefill",
            work,
            args.pd_threads,
            [*flags, "--kv-transfer-config", json.dumps(producer)],
            args.startup_timeout,
        )
        procs.append(p_proc)
        d_proc, d_url = _serve(
            "decode",
            work,
            args.pd_threads,
            [*flags, "--kv-transfer-config", json.dumps(consumer)],
            args.startup_timeout,
        )
        procs.append(d_proc)
        s_proc, s_url = _serve("single", work, args.threads, flags, args.startup_timeout)
        procs.append(s_proc)
        r_port = find_free_port()
        r_cmd = [sys.executable, "-m", "sagellm.engine.cli", "router", "--port", str(r_port)]
        r_cmd += ["--health-interval", "5", "--prefill", p_url, "--decode", d_url]
        procs.append(ServerProcess("router", r_cmd, r_port, log_path=work / "router.log"))
        r_url = f"http://127.0.0.1:{r_port}"
        paths = {"single": s_url, "disaggregated": r_url}

        warm = prompts(2, 16, seed=-1)
        for url in paths.values():
            asyncio.run(drive(url, "warm", warm, 4, 1))
        before = _metrics(d_url)
        runs: dict[str, list[Run]] = {name: [] for name in paths}
        same = total = 0
        for r in range(args.rounds):
            texts = prompts(args.requests, args.prompt_words, seed=r)
            order = list(paths) if r % 2 == 0 else list(paths)[::-1]
            got: dict[str, Run] = {}
            for name in order:
                print(f"[disagg] round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                got[name] = asyncio.run(
                    drive(paths[name], name, texts, args.max_tokens, args.concurrency)
                )
                runs[name].append(got[name])
            pairs = zip(got["single"].texts, got["disaggregated"].texts)
            same += sum(a == b and a != "" for a, b in pairs)
            total += len(texts)
        after = _metrics(d_url)
    finally:
        for proc in reversed(procs):
            proc.stop()

    def delta(name: str) -> float:
        return metric_sum(after, name) - metric_sum(before, name)

    loads = delta("sagellm_kv_transfer_num_loads_total")
    load_s = delta("sagellm_kv_transfer_load_seconds_total")
    failures = delta("sagellm_kv_transfer_num_load_failures_total")
    received = delta("sagellm_kv_channel_bytes_received_total")
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        ttft = [t for r in rs for t in r.ttft]
        itl = [t for r in rs for t in r.itl]
        summary[name] = {
            "ttft_p50_ms": 1e3 * statistics.median(ttft) if ttft else float("nan"),
            "ttft_p90_ms": 1e3 * percentile(ttft, 90),
            "itl_p50_ms": 1e3 * statistics.median(itl) if itl else float("nan"),
            "itl_p90_ms": 1e3 * percentile(itl, 90),
            "run_ttft_p50_ms": [1e3 * statistics.median(r.ttft) for r in rs if r.ttft],
            "errors": sum(len(r.errors) for r in rs),
        }
    mean_load_ms = 1e3 * load_s / loads if loads else float("nan")
    pd_ttft = summary["disaggregated"]["ttft_p50_ms"]
    summary["transfer"] = {
        "loads": int(loads),
        "failed_loads": int(failures),
        "mean_load_ms": mean_load_ms,
        "share_of_ttft_p50": mean_load_ms / pd_ttft if pd_ttft else float("nan"),
        "bandwidth_gbps": received / load_s / 1e9 if load_s else float("nan"),
        "mean_bytes": received / loads if loads else float("nan"),
    }
    summary["identical_texts"] = [same, total]
    s, d, t = summary["single"], summary["disaggregated"], summary["transfer"]
    print(
        f"{args.rounds} rounds x {args.requests} completions of {args.prompt_words} words, "
        f"{args.max_tokens} tokens, {args.concurrency} at once; dtype {args.dtype}; "
        f"single: {args.threads} threads; P and D: {args.pd_threads} each"
    )
    print(
        "| path | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p90 ms | TTFT p50 per run | errors |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in ("single", "disaggregated"):
        row = summary[name]
        per_run = ", ".join(f"{v:.1f}" for v in row["run_ttft_p50_ms"])
        print(
            f"| {name} | {row['ttft_p50_ms']:.1f} | {row['ttft_p90_ms']:.1f} | "
            f"{row['itl_p50_ms']:.2f} | {row['itl_p90_ms']:.2f} | {per_run} | {row['errors']} |"
        )
    print(
        f"disaggregated / single: TTFT p50 {d['ttft_p50_ms'] / s['ttft_p50_ms']:.2f}x, "
        f"ITL p50 {d['itl_p50_ms'] / s['itl_p50_ms']:.2f}x, "
        f"ITL p90 {d['itl_p90_ms'] / s['itl_p90_ms']:.2f}x"
    )
    print(
        f"KV transfer: {t['loads']} loads ({t['failed_loads']} failed), mean "
        f"{t['mean_load_ms']:.2f} ms for {t['mean_bytes'] / 1e6:.2f} MB "
        f"({t['bandwidth_gbps']:.2f} GB/s) = {100 * t['share_of_ttft_p50']:.1f}% of the "
        f"disaggregated TTFT p50"
    )
    print(f"identical greedy texts: {same}/{total}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
