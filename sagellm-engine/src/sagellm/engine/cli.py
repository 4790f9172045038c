"""The ``sagellm`` command: serve | generate | chat | bench | components | doctor."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sagellm.core.errors import ConfigError, SageLLMError
from sagellm.engine._version import __version__
from sagellm.engine.args import add_engine_arguments, engine_config_from_args

__all__ = ["main"]


def _progress(message: str) -> None:
    print(f"[sagellm] {message}", file=sys.stderr, flush=True)


def _add_sampling_arguments(parser: argparse.ArgumentParser, *, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=None, help="seed of the requests")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> Any:
    from sagellm.core.types import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sample_seed,
        stop=tuple(args.stop),
    )


def _build_llm(args: argparse.Namespace) -> Any:
    from sagellm.engine.llm import LLM

    config, options = engine_config_from_args(args)
    t0 = time.perf_counter()
    _progress(f"loading {config.model} ({config.runtime.name} runtime, {config.dtype})")
    llm = LLM(config=config, build_options=options)
    _progress(f"ready in {time.perf_counter() - t0:.1f} s")
    return llm


# ---------------------------------------------------------------------- commands


def server_config_from_args(
    args: argparse.Namespace,
    *,
    host: str | None = None,
    port: int | None = None,
    served_model_name: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The :class:`ServerConfig` of ``sagellm serve`` flags (``host``/``port``: fallbacks)."""
    from pydantic import ValidationError

    from sagellm.engine.config import ServerConfig, api_keys_from

    keys = api_keys_from(args.api_key or (), args.api_keys_file, environ=environ)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ConfigError(
            "--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)"
        )
    try:
        return ServerConfig(
            host=args.host or host or "127.0.0.1",
            port=args.port if args.port is not None else port,
            served_model_name=served_model_name,
            log_level=args.log_level,
            api_keys=keys,
            metrics_public=args.metrics_public,
            max_request_body_bytes=args.max_request_body_bytes,
            tenant_max_concurrent_requests=args.tenant_max_concurrent_requests,
            tenant_max_tokens_per_minute=args.tenant_max_tokens_per_minute,
            strict_request_fields=args.strict_request_fields,
            reasoning_markers=reasoning_markers(args.reasoning_parser),
            tool_call_parser=args.tool_call_parser,
            enable_auto_tool_choice=args.enable_auto_tool_choice,
            pooling=args.pooling,
            normalize_embeddings=not args.no_normalize_embeddings,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc'][:1]).replace('_', '-')}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid server options: {problems}") from None


def reasoning_markers(value: str | None) -> tuple[str, str] | None:
    """The (start, end) markers of ``--reasoning-parser``."""
    if value is None:
        return None
    if value == "think":
        return ("<think>", "</think>")
    try:
        data = json.loads(value)
        start, end = str(data.get("reasoning_start_str", "")), str(data["reasoning_end_str"])
    except (ValueError, KeyError, AttributeError, TypeError):
        raise ConfigError(
            f"--reasoning-parser {value!r}: give 'think' or JSON like "
            '{"reasoning_start_str": "<think>", "reasoning_end_str": "</think>"}'
        ) from None
    if not end:
        raise ConfigError("--reasoning-parser: reasoning_end_str must not be empty")
    return (start, end)


def cmd_serve(args: argparse.Namespace) -> int:
    from sagellm.engine.async_engine import AsyncLLMEngine
    from sagellm.engine.builder import EngineBuilder
    from sagellm.engine.llm_engine import LLMEngine
    from sagellm.engine.server import build_app, run_server

    config, options = engine_config_from_args(args)
    # Keys first: a bad keys file fails in a second, not after loading the model.
    server_config = server_config_from_args(
        args, host=config.host, port=config.port, served_model_name=config.served_model_name
    )
    t0 = time.perf_counter()

    def make() -> LLMEngine:
        parts = EngineBuilder(config, options, progress=_progress).build()
        _progress(
            f"engine ready in {time.perf_counter() - t0:.1f} s: {parts.model_name}, "
            f"max_model_len={parts.max_model_len}, {parts.kv_pool.num_blocks} KV blocks of "
            f"{parts.schema.block_size} tokens"
        )
        return LLMEngine(
            parts,
            speculative_config=options.speculative_config,
            kv_transfer_config=options.kv_transfer_config,
        )

    # built in the thread that steps it: one OpenMP team in the process
    engine = AsyncLLMEngine.build(make)
    app = build_app(engine, server_config)
    num_keys = len(server_config.api_keys)
    num_tenants = len({k.tenant_name() for k in server_config.api_keys})
    access = (
        f"{num_keys} API key(s) of {num_tenants} tenant(s)"
        if num_keys
        else "no API key: open to every client"
    )

    def ready(host: str, port: int) -> None:
        _progress(f"serving the OpenAI API on http://{host}:{port}/v1 ({access}; Ctrl-C stops)")

    run_server(app, server_config, on_ready=ready)
    return 0


def cmd_router(args: argparse.Namespace) -> int:
    from sagellm.engine.router import HTTPRouter, RouterConfig, run_router

    if args.port is None:
        from sagellm.core.ports import get_port

        args.port = get_port("control")
    try:
        config = RouterConfig(
            policy=args.policy,
            health_interval=args.health_interval,
            health_timeout=args.health_timeout,
            health_failures=args.health_failures,
            health_successes=args.health_successes,
            cache_threshold=args.cache_threshold,
            balance_abs_threshold=args.balance_abs_threshold,
            balance_rel_threshold=args.balance_rel_threshold,
            max_tree_chars=args.max_tree_chars,
            scrape_metrics=args.scrape_metrics,
            default_ttft_ms=args.default_ttft_ms,
        )
        prefill, decode = args.prefill or [], args.decode or []
        if len(prefill) != len(decode):
            raise ConfigError(
                f"--prefill and --decode pair up in order: got {len(prefill)} prefill and "
                f"{len(decode)} decode URL(s); give one --decode per --prefill"
            )
        if not args.worker_urls and not prefill:
            raise ConfigError("give --worker-urls, or --prefill and --decode pairs")
        router = HTTPRouter(args.worker_urls or [], config, pd_pairs=list(zip(prefill, decode)))
    except ValueError as exc:
        raise ConfigError(f"invalid router options: {exc}") from None

    def ready(host: str, port: int) -> None:
        _progress(
            f"routing the OpenAI API on http://{host}:{port}/v1 over "
            f"{len(args.worker_urls or [])} worker(s) and {len(args.prefill or [])} "
            f"prefill/decode pair(s), policy {args.policy} (Ctrl-C stops)"
        )

    run_router(router, args.host, args.port, log_level=args.log_level, on_ready=ready)
    return 0


def cmd_tp_worker(args: argparse.Namespace) -> int:
    from sagellm.engine.builder import EngineBuilder
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime
    from sagellm.engine.runtime.tensor_parallel import serve_worker

    config, options = engine_config_from_args(args)
    if config.runtime.name != "native":
        raise ConfigError("tensor parallelism is a feature of the native runtime")
    runtime_options = EngineBuilder(config, options).runtime_options()
    runtime_options.update(tensor_parallel_rank=args.rank, tensor_parallel_workers="external")
    rt_config = NativeRuntimeConfig.model_validate(runtime_options)
    if rt_config.tensor_parallel_size < 2 or rt_config.master_port == 0:
        raise ConfigError(
            "sagellm tp-worker needs --tensor-parallel-size (2 or more) and the --master-addr "
            "and --master-port that rank 0 was started with"
        )
    _progress(
        f"tensor-parallel rank {args.rank} of {rt_config.tensor_parallel_size}: joining "
        f"{rt_config.master_addr}:{rt_config.master_port}"
    )
    runtime = NativeRuntime(rt_config, progress=None)
    _progress(f"rank {args.rank} ready; serving rank 0's steps (ends with it)")
    try:
        serve_worker(runtime)
    finally:
        runtime.close()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _build_llm(args)
    prompts = list(args.prompt)
    if prompts == ["-"]:
        prompts = [sys.stdin.read()]
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, _sampling(args), use_tqdm=len(prompts) > 1)
    elapsed = time.perf_counter() - t0
    for out in outputs:
        for c in out.outputs:
            print(c.text if args.no_echo else out.prompt + c.text)
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    _progress(f"{tokens} tokens in {elapsed:.2f} s ({tokens / max(elapsed, 1e-9):.1f} tok/s)")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _build_llm(args)
    sampling = _sampling(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        _progress("type a message; an empty line or Ctrl-D ends the chat, /reset clears it")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            if interactive:
                break
            continue
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        out = llm.chat(history, sampling)[0]
        answer = out.outputs[0].text
        history.append({"role": "assistant", "content": answer})
        print(f"assistant> {answer}" if interactive else answer, flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sagellm.engine.bench.runner import run_from_args

    return run_from_args(args)


def cmd_components(args: argparse.Namespace) -> int:
    from sagellm.core import registry

    rows = []
    for slot, group in registry.GROUPS.items():
        infos = registry.available(slot, check=not args.no_check)
        if not infos:
            dist, extra = registry.GROUP_PROVIDERS.get(group, ("", ""))
            rows.append((slot, "-", "-", "-", f"none installed (pip install 'sagellm[{extra}]')"))
        for info in infos:
            status = "ok" if info.error is None else f"error: {info.error}"
            if not info.allowed:
                status = "excluded by SAGELLM_PLUGINS"
            rows.append((slot, info.name, info.distribution, info.version, status))
    widths = [
        max(len(r[i]) for r in rows + [("slot", "name", "distribution", "version", "")])
        for i in range(4)
    ]
    header = ("slot", "name", "distribution", "version", "status")
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    problems = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"[{'ok' if ok else 'FAIL'}] {what}: {detail}")

    report(sys.version_info >= (3, 10), "python", platform.python_version())
    report(True, "platform", f"{platform.system()} {platform.machine()} ({platform.platform()})")
    try:
        import torch

        report(
            True,
            "torch",
            f"{torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, cuda={'yes' if torch.cuda.is_available() else 'no'}",
        )
    except Exception as exc:  # doctor reports, never crashes
        report(False, "torch", f"cannot import: {exc}")
    try:
        import psutil

        vm = psutil.virtual_memory()
        report(
            vm.available > 2 << 30,
            "memory",
            f"{vm.available / 2**30:.1f} GiB available of {vm.total / 2**30:.1f} GiB "
            "(the default engine needs ~1.5 GiB)",
        )
    except Exception as exc:
        report(False, "memory", f"unknown ({exc})")
    model = args.model or "smollm2-135m"
    try:
        from sagellm.engine.models.source import resolve_model

        src = resolve_model(model)
        size = src.path.stat().st_size if src.path.is_file() else 0
        report(
            True,
            "model",
            f"{src.name} ({src.kind}) at {src.path}"
            + (f", {size / 2**20:.0f} MiB" if size else ""),
        )
    except Exception as exc:
        report(False, "model", str(exc))
    from sagellm.core import registry

    for slot, default in (("runtime", "native"), ("kv_pool", "paged"), ("scheduler", "fcfs")):
        infos = {i.name: i for i in registry.available(slot, check=True)}
        info = infos.get(default)
        if info is None:
            dist, extra = registry.GROUP_PROVIDERS[registry.GROUPS[slot]]
            report(False, slot, f"no {default!r} implementation; install {dist}")
        else:
            report(
                info.error is None,
                slot,
                f"{default} from {info.distribution} {info.version}"
                + (f" ({info.error})" if info.error else ""),
            )
    # lmdeploy runtime: informational, never a problem (the native runtime needs no lmdeploy)
    from sagellm.engine.runtime.lmdeploy.doctor import doctor_lines

    print("\n".join(doctor_lines()))
    print("all checks passed" if problems == 0 else f"{problems} problem(s) found")
    return 0 if problems == 0 else 1


# ---------------------------------------------------------------------- parser


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    from sagellm.engine.config import DEFAULT_MAX_REQUEST_BODY_BYTES

    g = parser.add_argument_group("access and limits")
    g.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="accept this key as 'Authorization: Bearer KEY' on /v1/* (repeatable; default: "
        "$SAGELLM_API_KEY); its tenant is key-<8 hex digits of its sha256>",
    )
    g.add_argument(
        "--api-keys-file",
        metavar="PATH",
        help="keys file: JSON/YAML mapping key -> {tenant, priority, max_concurrent_requests, "
        "max_tokens_per_minute}, or lines 'key' / 'key tenant'",
    )
    g.add_argument(
        "--metrics-public", action="store_true", help="serve /metrics without an API key"
    )
    g.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        metavar="N",
        help=f"larger request bodies get 413 (default: {DEFAULT_MAX_REQUEST_BODY_BYTES})",
    )
    g.add_argument(
        "--tenant-max-concurrent-requests",
        type=int,
        metavar="N",
        help="requests a tenant may run at once (default: unlimited; keys file overrides)",
    )
    g.add_argument(
        "--tenant-max-tokens-per-minute",
        type=int,
        metavar="N",
        help="prompt + max_tokens a tenant may be admitted per minute (default: unlimited)",
    )
    g.add_argument(
        "--strict-request-fields",
        action="store_true",
        help="reject requests with unknown fields (400) instead of logging a warning",
    )
    g.add_argument(
        "--reasoning-parser",
        default=None,
        help="split chat replies into reasoning_content and content: 'think' (<think>...</think>)"
        ' or JSON {"reasoning_start_str": ..., "reasoning_end_str": ...}; also the markers '
        "a per-request thinking_token_budget counts between",
    )
    g.add_argument(
        "--tool-call-parser",
        choices=("hermes", "llama3_json"),
        default=None,
        help="format of the model's tool calls: hermes (<tool_call>{...}</tool_call>) or "
        'llama3_json ({"name": ..., "parameters": ...}); tool_choice required/named uses it '
        "too (default there: hermes)",
    )
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='allow tool_choice "auto" (the default when a request has tools): the reply is '
        "parsed for calls with --tool-call-parser",
    )
    g.add_argument(
        "--pooling",
        choices=("last", "mean"),
        default="last",
        help="how /v1/embeddings pools the prompt's final hidden states: the last token's "
        "(default) or the mean over all tokens",
    )
    g.add_argument(
        "--no-normalize-embeddings",
        action="store_true",
        help="return embeddings as pooled, without scaling them to unit L2 norm",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sagellm",
        description="sageLLM: modular LLM inference engine (OpenAI-compatible server, CLI)",
    )
    parser.add_argument("--version", action="version", version=f"sagellm-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve the model over the OpenAI API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics).",
    )
    add_engine_arguments(p)
    p.add_argument("--host", help="bind address (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, help="port (default: chosen by sagellm.core.ports; 0 picks a free one)"
    )
    p.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    _add_server_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "tp-worker",
        help="run one tensor-parallel rank (1..N-1) for a rank 0 on another host",
        description="Load this rank's slice of the model and run the steps that rank 0 "
        "(sagellm serve --tensor-parallel-size N --tensor-parallel-workers external "
        "--master-addr A --master-port P) sends, until it stops. Give the same model "
        "flags as rank 0.",
    )
    add_engine_arguments(p)
    p.add_argument("--rank", type=int, required=True, help="this rank, 1..N-1")
    p.set_defaults(func=cmd_tp_worker)

    p = sub.add_parser(
        "router",
        help="route the OpenAI API over several servers (control plane)",
        description="An OpenAI-compatible front (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics) that sends each request to one healthy worker "
        "serving its model, chosen by a routing policy.",
    )
    p.add_argument(
        "--worker-urls",
        nargs="+",
        metavar="URL",
        help="workers: URL, or URL@model[,model] to declare the models instead of "
        "reading them from the worker's /v1/models; a trailing #kind declares the device "
        "kind (URL#npu), which requests may ask for with the x-sagellm-device header",
    )
    p.add_argument(
        "--prefill",
        action="append",
        metavar="URL",
        help="prefill/decode disaggregation: a prefill worker (a server started with "
        "kv_role kv_producer); repeat it, each paired in order with one --decode",
    )
    p.add_argument(
        "--decode",
        action="append",
        metavar="URL",
        help="the decode worker (kv_role kv_consumer, paired with that producer) of the "
        "--prefill worker in the same position",
    )
    p.add_argument(
        "--policy",
        choices=("round_robin", "least_load", "cache_aware", "slo"),
        default="cache_aware",
        help="routing policy (default: cache_aware; slo: by predicted TTFT against the "
        "request's x-sagellm-ttft-ms header or --default-ttft-ms)",
    )
    p.add_argument(
        "--default-ttft-ms",
        type=float,
        metavar="MS",
        help="slo: the TTFT objective of requests without the x-sagellm-ttft-ms header",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, help="port (default: sagellm.core.ports 'control', 8100; 0: free)"
    )
    p.add_argument(
        "--health-interval", type=float, default=10.0, metavar="S", help="seconds between checks"
    )
    p.add_argument("--health-timeout", type=float, default=5.0, metavar="S")
    p.add_argument(
        "--health-failures", type=int, default=3, help="consecutive failures that take a worker out"
    )
    p.add_argument(
        "--health-successes", type=int, default=2, help="consecutive successes that bring it back"
    )
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=0.3,
        help="cache_aware: matched fraction of the prompt above which its worker is chosen",
    )
    p.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=64,
        help="cache_aware: loads are imbalanced when max - min exceeds this ...",
    )
    p.add_argument(
        "--balance-rel-threshold",
        type=float,
        default=1.5,
        help="... and max > min * this; then the least loaded worker is chosen",
    )
    p.add_argument(
        "--max-tree-chars",
        type=int,
        default=1 << 22,
        help="cache_aware: characters kept per worker's prefix tree (LRU eviction)",
    )
    p.add_argument(
        "--scrape-metrics",
        action="store_true",
        help="also read running + waiting requests from each worker's /metrics (sageLLM or "
        "vLLM names) at every health check, as the load",
    )
    p.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(func=cmd_router)

    p = sub.add_parser(
        "generate",
        help="complete prompts offline and print the text",
        description="Complete one or more prompts ('-' reads stdin).",
    )
    p.add_argument("prompt", nargs="+", help="prompt text ('-' reads stdin)")
    p.add_argument("--no-echo", action="store_true", help="print only the completion")
    add_engine_arguments(p)
    _add_sampling_arguments(p, max_tokens=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="chat with the model (REPL; reads stdin when piped)",
        description="Interactive chat using the model's chat template. With "
        "stdin not a terminal, every line is a user turn and every answer a line.",
    )
    p.add_argument("--system", help="system prompt")
    add_engine_arguments(p)
    _add_sampling_arguments(p, max_tokens=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "bench",
        help="benchmark throughput and latency against baselines",
        description="Offline throughput, batch-1 decode, prefill, server TTFT/"
        "TPOT, side by side with transformers and llama.cpp when installed.",
    )
    add_engine_arguments(p)
    from sagellm.engine.bench.runner import add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "components",
        help="list installed implementations of every slot",
        description="Every entry-point group with its implementations, "
        "distribution, version and import status.",
    )
    p.add_argument("--no-check", action="store_true", help="do not import the plugins")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser(
        "doctor",
        help="check the installation",
        description="Check python, torch, threads, memory, the model and the default components.",
    )
    p.add_argument("--model", help="model to look for (default: smollm2-135m)")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sagellm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except SageLLMError as exc:
        print(f"sagellm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
