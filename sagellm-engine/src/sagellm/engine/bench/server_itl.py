"""The server's per-token overhead: inter-token latency at one client against the offline
batch-1 decode step, in the same run.

Starts ``sagellm serve`` (the default engine, ``--threads``) in a subprocess, and builds
the same engine in this process for the offline side. Each round, interleaved and in
alternating order, it streams ``--requests`` greedy completions one at a time from one
client (random-token prompts of ``--prompt-len``, ``--max-tokens`` tokens, EOS ignored)
and times the gaps between streamed tokens at the client; and it runs the same requests
through the offline engine one at a time, timing its decode steps (``LLMEngine.step``).
The report gives each side's median per round and the ratio of the medians over all
rounds (the issue's "ITL within 10% of the offline step").

The offline engine sits idle while the client streams and the server's engine sits idle
(waiting on its queue) while the offline engine steps, so neither takes the other's
cores. The client shares the machine's cores with the server, as any local load
generator does.

Usage::

    python -m sagellm.engine.bench.server_itl --threads 2 --rounds 3 --requests 6
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sagellm.core.ports import find_free_port
from sagellm.engine.bench.serve_peers import ServerProcess

__all__ = ["build_parser", "gaps", "main", "summarize"]


def gaps(times: Sequence[float], skip: int = 1) -> list[float]:
    """Seconds between consecutive token times, leaving out the first ``skip`` gaps (the
    first one follows the prefill on the offline side; the client's first token is the
    TTFT, not a gap)."""
    return [b - a for a, b in zip(times[skip:], times[skip + 1 :])]


def summarize(server: Sequence[Sequence[float]], offline: Sequence[Sequence[float]]) -> str:
    """Per-round medians (ms) of both sides and the ratio of the overall medians."""
    lines = ["round  server ITL p50 ms  offline step p50 ms"]
    for i, (s, o) in enumerate(zip(server, offline), start=1):
        lines.append(
            f"{i:5d}  {1e3 * statistics.median(s):17.2f}  {1e3 * statistics.median(o):19.2f}"
        )
    s_all = [g for r in server for g in r]
    o_all = [g for r in offline for g in r]
    s_med, o_med = statistics.median(s_all), statistics.median(o_all)
    lines.append(
        f"all    {1e3 * s_med:17.2f}  {1e3 * o_med:19.2f}   server / offline = "
        f"{s_med / o_med:.3f} (target <= 1.10); means {1e3 * statistics.fmean(s_all):.2f} "
        f"vs {1e3 * statistics.fmean(o_all):.2f} ms"
    )
    return "\n".join(lines)


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(n)]


def _client_round(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> list[float]:
    import httpx

    out: list[float] = []
    with httpx.Client(timeout=120) as client:
        for prompt in prompts:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": True,
                "ignore_eos": True,
            }
            times: list[float] = []
            with client.stream("POST", url + "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:300]!r}")
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if any(c.get("text") for c in event.get("choices", [])):
                        times.append(time.perf_counter())
            out += gaps(times, skip=0)
    return out


def _offline_round(engine: Any, prompts: list[list[int]], max_tokens: int) -> list[float]:
    from sagellm.core.types import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out: list[float] = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"itl-{time.monotonic_ns()}-{i}", prompt, sp)
        times: list[float] = []
        while engine.has_unfinished_requests():
            engine.step()
            times.append(time.perf_counter())
        out += gaps(times)  # the first gap follows the prefill step
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sagellm.engine.bench.server_itl")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=6, help="streamed one at a time per round")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from sagellm.engine.llm import LLM

    port = find_free_port()
    log = Path(tempfile.mkdtemp(prefix="sagellm-itl-")) / "serve.log"
    cmd = [sys.executable, "-m", "sagellm.engine.cli", "serve", "--model", args.model]
    cmd += ["--port", str(port), "--threads", str(args.threads)]
    print(f"starting {' '.join(cmd[2:])} (log {log})", file=sys.stderr)
    server = ServerProcess("sagellm serve", cmd, port, log_path=log)
    try:
        url = f"http://127.0.0.1:{port}"
        import httpx

        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        engine = LLM(model=args.model, num_threads=args.threads, seed=0).engine
        warm = _prompts(1, args.prompt_len, seed=99)
        _client_round(url, model, warm, 8)
        _offline_round(engine, warm, 8)
        server_rounds: list[list[float]] = []
        offline_rounds: list[list[float]] = []
        for r in range(args.rounds):
            prompts = _prompts(args.requests, args.prompt_len, seed=r)
            order = ("server", "offline") if r % 2 == 0 else ("offline", "server")
            for side in order:
                if side == "server":
                    server_rounds.append(_client_round(url, model, prompts, args.max_tokens))
                else:
                    offline_rounds.append(_offline_round(engine, prompts, args.max_tokens))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        server.stop()
    print(
        f"one client, {args.requests} requests x {args.max_tokens} tokens per round, "
        f"{args.prompt_len}-token prompts, {args.threads} threads, {args.rounds} rounds "
        "(A B interleaved, alternating)"
    )
    print(summarize(server_rounds, offline_rounds))


if __name__ == "__main__":
    main()
