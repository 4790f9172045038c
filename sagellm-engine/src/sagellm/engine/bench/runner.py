"""``sagellm bench``: the engine and its baselines side by side in one run.

Sections: matmul peak (2048^3, float32 and bfloat16), sageLLM offline (throughput of N
requests x M tokens, batch-1 decode, prefill), sageLLM server (TTFT/TPOT p50/p99 at a
concurrency, through the official openai client), peak RSS of the engine, transformers
``generate`` (float32 and bfloat16, padded batch; ``generate_batch`` continuous batching
when present) and llama.cpp through llama-cpp-python when installed. The table reports
each figure, the ratio sageLLM / baseline, and the fraction of the measured matmul peak.

``--peers vllm,llama.cpp,transformers`` instead compares the engine with each installed
peer, figure by figure, sampled alternately (:mod:`sagellm.engine.bench.peers`);
``--server-peers vllm`` compares ``sagellm serve`` with ``vllm serve`` under guidellm
(:mod:`sagellm.engine.bench.serve_peers`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from typing import Any

from sagellm.engine.bench.workloads import (
    Workload,
    llama_cpp_runs,
    measure_matmul_peak,
    sagellm_offline,
    sagellm_server,
    transformers_runs,
)

__all__ = ["add_bench_arguments", "format_table", "run", "run_from_args"]

_SECTIONS = ("offline", "server", "transformers", "llama.cpp")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``sagellm bench``."""
    g = parser.add_argument_group("benchmark")
    g.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="offline batch size N (default 32; 64 with --peers, the issue's 64 x 64)",
    )
    g.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    g.add_argument("--output-len", type=int, default=64, help="tokens generated per request (M)")
    g.add_argument("--decode-len", type=int, default=64, help="batch-1 decode tokens")
    g.add_argument("--prefill-len", type=int, default=512, help="prefill prompt tokens")
    g.add_argument("--concurrency", type=int, default=8, help="server: parallel clients")
    g.add_argument("--server-requests", type=int, default=32, help="server: requests in total")
    g.add_argument("--bench-seed", type=int, default=0, help="workload seed")
    g.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=_SECTIONS,
        help="leave a section out (repeatable)",
    )
    g.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    g.add_argument(
        "--workload",
        choices=["prefix", "tiers", "goodput", "eviction"],
        help="run one KV-management comparison instead (sagellm.engine.bench.kv_workloads)",
    )
    from sagellm.engine.bench.kv_workloads import add_goodput_arguments

    add_goodput_arguments(parser)
    p = parser.add_argument_group("peers (sagellm.engine.bench.peers, serve_peers)")
    p.add_argument(
        "--peers",
        metavar="LIST",
        help="compare with these peers instead: comma list of vllm, llama.cpp, transformers "
        "(offline N x M, batch-1 decode, prefill; absent peers are skipped; `nox -s peers` "
        "prepares them)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="--peers: interleaved rounds per figure, A B A B (default 2; p < 0.05 needs 4)",
    )
    p.add_argument(
        "--vllm-python",
        metavar="PATH",
        help="python of vLLM's venv (default: $SAGELLM_VLLM_PYTHON, else .nox/peers-vllm)",
    )
    p.add_argument(
        "--server-peers",
        metavar="LIST",
        help="compare `sagellm serve` with these servers under guidellm: vllm, or none "
        "(sageLLM alone)",
    )
    p.add_argument(
        "--server-rounds", type=int, default=1, help="--server-peers: turns of each server"
    )
    p.add_argument(
        "--guidellm",
        metavar="PATH",
        help="guidellm executable (default: $SAGELLM_GUIDELLM, .nox/peers-tools, PATH)",
    )
    p.add_argument(
        "--guidellm-concurrency",
        default="1,8,32",
        metavar="LIST",
        help="--server-peers: concurrency levels (default 1,8,32)",
    )
    p.add_argument(
        "--guidellm-requests", type=int, default=48, help="requests per level (default 48)"
    )
    p.add_argument(
        "--guidellm-prompt-tokens", type=int, default=256, help="prompt tokens (default 256)"
    )
    p.add_argument(
        "--guidellm-output-tokens", type=int, default=64, help="output tokens (default 64)"
    )


def _flops_per_token(model_config: Any) -> float | None:
    """Matmul FLOPs of one token's forward pass (2 x weights it multiplies)."""
    c = model_config
    if c is None:
        return None
    h, hd = c.hidden_size, c.head_dim
    attn = h * c.num_heads * hd + 2 * h * c.num_kv_heads * hd + c.num_heads * hd * h
    mlp = 3 * h * c.intermediate_size
    return 2.0 * (c.num_layers * (attn + mlp) + h * c.vocab_size)


def _rss_mib() -> tuple[float, float]:
    import psutil

    rss = psutil.Process().memory_info().rss / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return rss, peak


def run(
    llm: Any,
    w: Workload,
    *,
    skip: tuple[str, ...] = (),
    progress: Any = print,
) -> dict[str, Any]:
    """Measure every section not in ``skip``; return ``{system: {metric: value}}`` + meta."""
    import torch

    results: dict[str, dict[str, float]] = {}
    progress("measuring the matmul peak (2048^3)")
    peak = measure_matmul_peak()
    if "offline" not in skip:
        progress(f"sagellm offline: {w.num_requests} x {w.output_len} tokens, decode, prefill")
        results["sagellm"] = sagellm_offline(llm, w)
    if "server" not in skip:
        progress(f"sagellm server: {w.server_requests} requests at concurrency {w.concurrency}")
        results.setdefault("sagellm", {}).update(sagellm_server(llm, w))
    rss, peak_rss = _rss_mib()
    results.setdefault("sagellm", {})["rss_mib"] = rss
    results["sagellm"]["peak_rss_mib"] = peak_rss

    source = getattr(llm.engine.runtime, "source", None)
    vocab = llm.engine.vocab_size
    notes: list[str] = []
    if "transformers" not in skip and source is not None:
        try:
            results.update(transformers_runs(source, vocab, w, progress=progress))
        except Exception as exc:
            notes.append(f"transformers skipped: {type(exc).__name__}: {exc}")
    if "llama.cpp" not in skip:
        if importlib.util.find_spec("llama_cpp") is None:
            notes.append(
                "llama.cpp skipped: llama-cpp-python is not installed "
                "(pip install llama-cpp-python; it compiles for ~13 minutes)"
            )
        elif source is None or source.kind != "gguf":
            notes.append("llama.cpp skipped: the model is not a GGUF file")
        else:
            progress("llama.cpp: batch-1 decode and prefill")
            try:
                results["llama.cpp"] = llama_cpp_runs(source, w, torch.get_num_threads())
            except Exception as exc:
                notes.append(f"llama.cpp failed: {type(exc).__name__}: {exc}")
    return {
        "results": results,
        "matmul_peak_gflops": peak,
        "flops_per_token": _flops_per_token(getattr(llm.engine.runtime, "model_config", None)),
        "dtype": str(getattr(llm.engine.runtime, "dtype", "")).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "workload": w.__dict__,
        "notes": notes,
    }


_METRICS = (
    ("throughput_tok_s", "offline throughput (tok/s)", True),
    ("decode_b1_tok_s", "batch-1 decode (tok/s)", True),
    ("prefill_tok_s", "prefill (tok/s)", True),
    ("server_throughput_tok_s", "server throughput (tok/s)", True),
    ("server_ttft_p50_s", "server TTFT p50 (s)", False),
    ("server_ttft_p99_s", "server TTFT p99 (s)", False),
    ("server_tpot_p50_s", "server TPOT p50 (s)", False),
    ("server_tpot_p99_s", "server TPOT p99 (s)", False),
    ("rss_mib", "engine RSS (MiB)", False),
    ("peak_rss_mib", "engine peak RSS (MiB)", False),
)


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: one row per metric, one column per system, ratios and peak."""
    results: dict[str, dict[str, float]] = report["results"]
    systems = ["sagellm"] + [s for s in results if s != "sagellm"]
    ours = results.get("sagellm", {})
    flops = report.get("flops_per_token")
    peak = report["matmul_peak_gflops"]
    dtype_peak = peak.get(report.get("dtype") or "float32", peak["float32"])
    header = ["metric", *systems, *[f"sagellm/{s}" for s in systems[1:]], "sagellm % peak"]
    rows = [header]
    for key, label, throughput in _METRICS:
        if not any(key in results.get(s, {}) for s in systems):
            continue
        row = [label]
        for s in systems:
            v = results.get(s, {}).get(key)
            row.append("-" if v is None else f"{v:.4g}")
        for s in systems[1:]:
            a, b = ours.get(key), results.get(s, {}).get(key)
            row.append("-" if a is None or b is None or b == 0 else f"{a / b:.2f}x")
        pct = "-"
        if throughput and flops and key in ours and key != "server_throughput_tok_s":
            pct = f"{100 * ours[key] * flops / 1e9 / dtype_peak:.1f}%"
        row.append(pct)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    lines.append("")
    lines.append(
        f"matmul peak (2048^3, {report['threads']} threads): float32 {peak['float32']:.0f} "
        f"GFLOP/s, bfloat16 {peak['bfloat16']:.0f} GFLOP/s; engine dtype {report.get('dtype')}"
    )
    lines.extend(report.get("notes", []))
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    """``sagellm bench`` with parsed flags."""
    if getattr(args, "workload", None):
        from sagellm.engine.bench import kv_workloads

        argv = [args.workload, "--threads", str(args.num_threads or 2)]
        argv += ["--model", args.model] if args.model else []
        argv += ["--dtype", args.dtype] if args.dtype else []
        if args.workload == "goodput":
            argv += ["--seeds", str(args.seeds), "--clock", args.clock]
            argv += ["--workload-shape", args.workload_shape]
            argv += ["--calibration", args.calibration] if args.calibration else []
            argv += ["--slo-scale", *map(str, args.slo_scale)] if args.slo_scale else []
            argv += ["--no-validate"] if args.no_validate else []
            argv += ["--schedule-only"] if args.schedule_only else []
            argv += ["--recalibrate"] if args.recalibrate else []
            argv += ["--validate-runs", str(args.validate_runs)]
        kv_workloads.main(argv)
        return 0
    from sagellm.engine.args import engine_config_from_args
    from sagellm.engine.llm import LLM

    def progress(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    peers = _names(getattr(args, "peers", None))
    server_peers = getattr(args, "server_peers", None)
    report: dict[str, Any] = {}
    if server_peers is not None:
        report["servers"] = _run_server_peers(args, _names(server_peers), progress)
        if not peers:
            _write_json(args, report["servers"])
            return 0
    config, options = engine_config_from_args(args)
    num_requests = args.num_requests or (64 if peers else 32)
    w = Workload(
        num_requests=num_requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        decode_len=args.decode_len,
        prefill_len=args.prefill_len,
        concurrency=args.concurrency,
        server_requests=args.server_requests,
        seed=args.bench_seed,
    )
    progress(f"loading {config.model}")
    t0 = time.perf_counter()
    llm = LLM(config=config, build_options=options)
    progress(f"engine ready in {time.perf_counter() - t0:.1f} s")
    if peers:
        from sagellm.engine.bench.peers import format_comparisons, run_peers

        report["peers"] = run_peers(
            llm,
            peers,
            w,
            rounds=args.rounds,
            vllm_python=args.vllm_python,
            progress=progress,
        )
        print(format_comparisons(report["peers"]))
        _write_json(args, report if "servers" in report else report["peers"])
        return 0
    report = run(llm, w, skip=tuple(args.skip), progress=progress)
    print(format_table(report))
    _write_json(args, report)
    return 0


def _names(raw: str | None) -> list[str]:
    """A comma list of names; "none" and "" are the empty list."""
    if raw is None:
        return []
    return [n.strip().lower() for n in raw.split(",") if n.strip() and n.strip() != "none"]


def _write_json(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)


#: Engine flags of `sagellm serve` that the bench's own flags carry over.
_SERVE_FLAGS = {"num_threads": "--threads"}


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags given to ``sagellm bench``, for ``sagellm serve``."""
    from sagellm.engine.args import _ARG_KEYS

    out: list[str] = []
    if getattr(args, "config", None):
        out += ["--config", str(args.config)]
    for key in _ARG_KEYS:
        value = getattr(args, key, None)
        if value is None or key == "served_model_name":
            continue
        out += [_SERVE_FLAGS.get(key, "--" + key.replace("_", "-")), str(value)]
    return out


def _run_server_peers(args: argparse.Namespace, peers: list[str], progress: Any) -> dict[str, Any]:
    import os

    from sagellm.engine.bench.serve_peers import (
        GuidellmLoad,
        format_server_table,
        run_server_peers,
    )

    load = GuidellmLoad(
        concurrency=tuple(int(c) for c in args.guidellm_concurrency.split(",") if c.strip()),
        requests=args.guidellm_requests,
        prompt_tokens=args.guidellm_prompt_tokens,
        output_tokens=args.guidellm_output_tokens,
    )
    try:
        threads = args.num_threads or len(os.sched_getaffinity(0))
    except AttributeError:
        threads = args.num_threads or os.cpu_count() or 1
    report = run_server_peers(
        peers,
        model=args.model,
        engine_flags=engine_flags(args),
        load=load,
        rounds=args.server_rounds,
        threads=threads,
        guidellm=args.guidellm,
        vllm_python=args.vllm_python,
        served_name=args.served_model_name,
        progress=progress,
    )
    print(format_server_table(report))
    return report
