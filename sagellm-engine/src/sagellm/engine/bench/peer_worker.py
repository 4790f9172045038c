"""A benchmark peer in its own process: one engine, driven by JSON lines.

Run as a script by another interpreter (vLLM's own venv, a baseline revision's venv),
so it imports nothing of sageLLM at module level and only public API of the backend it
hosts::

    python -P peer_worker.py vllm --model DIR [--options JSON]
    python -P peer_worker.py sagellm --model smollm2-135m --options '{"num_threads": 2}'
    python -P peer_worker.py llama.cpp --model FILE.gguf --options '{"n_threads": 2}'

Protocol: the worker answers on its original stdout, one line per message, each line
``@@peer <json>``; everything libraries print goes to stderr (stdout is redirected there
at start, child processes included). First message: ``{"ready": true, "info": {...}}`` or
``{"error": "..."}``. Then one answer per request line read from stdin:

- ``{"op": "generate", "prompts": [[ids...], ...], "max_tokens": M}``: greedy, end of
  sequence ignored; answers ``{"seconds": wall time, "num_generated": tokens}``;
- ``{"op": "exit"}``: answers ``{"bye": true}`` and exits.

A failing request answers ``{"error": "..."}`` and the worker goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

PREFIX = "@@peer "

#: (prompts, max_tokens) -> (seconds, tokens generated)
Generate = Callable[[list[list[int]], int], tuple[float, int]]


def _sagellm(model: str, options: dict[str, Any]) -> tuple[Generate, dict[str, Any]]:
    from sagellm.core.types import SamplingParams
    from sagellm.engine.llm import LLM

    llm = LLM(model=model, **options)

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        out = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
        return elapsed, sum(len(c.token_ids) for r in out for c in r.outputs)

    import torch

    runtime = llm.engine.runtime
    info = {
        "backend": "sagellm",
        "dtype": str(getattr(runtime, "dtype", "")).replace("torch.", ""),
        "threads": torch.get_num_threads(),
    }
    try:
        from sagellm.engine._version import __version__

        info["version"] = __version__
    except ImportError:
        pass
    return generate, info


def _vllm(model: str, options: dict[str, Any]) -> tuple[Generate, dict[str, Any]]:
    import vllm
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {"dtype": "bfloat16", "seed": 0}
    kwargs.update(options)
    llm = LLM(model=model, **kwargs)

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        inputs: Any = [{"prompt_token_ids": p} for p in prompts]
        t0 = time.perf_counter()
        out = llm.generate(inputs, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        return elapsed, sum(len(c.token_ids) for r in out for c in r.outputs)

    return generate, {"backend": "vllm", "version": vllm.__version__, **kwargs}


def _llama_cpp(model: str, options: dict[str, Any]) -> tuple[Generate, dict[str, Any]]:
    import llama_cpp
    from llama_cpp import Llama

    kwargs: dict[str, Any] = {"n_ctx": 2048, "n_batch": 512, "verbose": False}
    kwargs.update(options)
    llm = Llama(model_path=model, **kwargs)

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        if len(prompts) != 1:
            raise ValueError("llama-cpp-python runs one sequence at a time")
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompts[0])
        for i in range(max_tokens):
            tok = llm.sample(temp=0.0)
            if i + 1 < max_tokens:
                llm.eval([tok])
        return time.perf_counter() - t0, max_tokens

    info = {"backend": "llama.cpp", "version": llama_cpp.__version__, **kwargs}
    return generate, info


BACKENDS: dict[str, Callable[[str, dict[str, Any]], tuple[Generate, dict[str, Any]]]] = {
    "sagellm": _sagellm,
    "vllm": _vllm,
    "llama.cpp": _llama_cpp,
}


def serve(backend: str, model: str, options: dict[str, Any]) -> int:
    """Build the engine, then answer requests from stdin until ``exit`` or end of input."""
    # The protocol keeps the real stdout; libraries (and their child processes) print to
    # stderr, so nothing they print can be mistaken for an answer.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(msg: dict[str, Any]) -> None:
        proto.write(PREFIX + json.dumps(msg) + "\n")
        proto.flush()

    try:
        generate, info = BACKENDS[backend](model, options)
    except Exception as exc:
        traceback.print_exc()
        send({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    send({"ready": True, "info": info})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "exit":
                send({"bye": True})
                return 0
            if op != "generate":
                raise ValueError(f"unknown op {op!r}")
            seconds, tokens = generate(req["prompts"], int(req["max_tokens"]))
            send({"seconds": seconds, "num_generated": tokens})
        except Exception as exc:
            traceback.print_exc()
            send({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line of the worker (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backend", choices=sorted(BACKENDS))
    p.add_argument("--model", required=True)
    p.add_argument("--options", default="{}", help="engine keyword options as JSON")
    args = p.parse_args(argv)
    return serve(args.backend, args.model, json.loads(args.options))


if __name__ == "__main__":  # vLLM spawns processes: build it only in the main module
    sys.exit(main())
