"""Measurements of the engine and of its baselines on one seeded workload.

Every function returns plain numbers; :mod:`sagellm.engine.bench.runner` puts them side by
side. Prompts are random token ids (seeded), generation ignores end-of-sequence so every
system produces exactly the requested number of tokens.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Workload",
    "measure_matmul_peak",
    "percentile",
    "random_prompts",
    "sagellm_offline",
    "sagellm_server",
    "transformers_runs",
    "llama_cpp_runs",
]


@dataclass(frozen=True)
class Workload:
    """What every system runs."""

    num_requests: int = 32  # offline throughput: requests in one batch
    prompt_len: int = 128  # tokens per prompt
    output_len: int = 64  # tokens generated per request
    decode_len: int = 64  # batch-1 decode: tokens generated
    prefill_len: int = 512  # prefill measurement: prompt tokens
    concurrency: int = 8  # server: parallel clients
    server_requests: int = 32  # server: requests in total
    seed: int = 0


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``num`` prompts of ``length`` token ids drawn from the lower vocabulary."""
    rng = random.Random(seed)
    hi = max(2, min(vocab, 32000) - 1)
    return [[rng.randrange(1, hi) for _ in range(length)] for _ in range(num)]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; nan when empty."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def measure_matmul_peak(size: int = 2048, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of a ``size``^3 matmul in float32 and bfloat16 (best of ``repeats``)."""
    import torch

    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b  # warm up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * size**3 / best / 1e9
    return out


# ---------------------------------------------------------------------- sageLLM


def sagellm_offline(llm: Any, w: Workload) -> dict[str, float]:
    """Throughput, batch-1 decode and prefill of an :class:`~sagellm.engine.LLM`."""
    from sagellm.core.types import SamplingParams

    vocab = llm.engine.vocab_size
    prompts = random_prompts(w.num_requests, w.prompt_len, vocab, w.seed)
    greedy = dict(temperature=0.0, ignore_eos=True)
    # Warm up with the shapes measured below: the first steps at a new batch shape pay
    # one-off allocator and kernel set-up costs that are not the engine's steady state.
    warm = min(8, w.output_len)
    llm.generate(prompts, SamplingParams(max_tokens=warm, **greedy))
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=warm, **greedy))
    out: dict[str, float] = {}

    t0 = time.perf_counter()
    results = llm.generate(prompts, SamplingParams(max_tokens=w.output_len, **greedy))
    elapsed = time.perf_counter() - t0
    gen = sum(len(c.token_ids) for r in results for c in r.outputs)
    out["throughput_tok_s"] = gen / elapsed
    out["throughput_total_tok_s"] = (gen + w.num_requests * w.prompt_len) / elapsed

    (one,) = llm.generate([prompts[0][:16]], SamplingParams(max_tokens=w.decode_len, **greedy))
    m = one.metrics
    if m.first_token_time is not None and m.finished_time is not None and w.decode_len > 1:
        out["decode_b1_tok_s"] = (w.decode_len - 1) / (m.finished_time - m.first_token_time)

    long = random_prompts(1, w.prefill_len, vocab, w.seed + 1)
    t0 = time.perf_counter()
    llm.generate(long, SamplingParams(max_tokens=1, **greedy))
    out["prefill_tok_s"] = w.prefill_len / (time.perf_counter() - t0)
    return out


def sagellm_server(llm: Any, w: Workload) -> dict[str, float]:
    """TTFT/TPOT percentiles of the OpenAI server driven by ``concurrency`` clients."""
    import openai

    from sagellm.engine.async_engine import AsyncLLMEngine
    from sagellm.engine.config import ServerConfig
    from sagellm.engine.server import ServerThread, build_app

    engine = AsyncLLMEngine(llm.engine)
    app = build_app(engine, ServerConfig(port=0))
    prompts = random_prompts(w.server_requests, w.prompt_len, llm.engine.vocab_size, w.seed + 2)
    ttfts: list[float] = []
    tpots: list[float] = []
    lock = threading.Lock()
    with ServerThread(app, ServerConfig(port=0)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)

        def one(prompt: list[int]) -> int:
            t0 = time.perf_counter()
            first = last = None
            n = 0
            stream = client.completions.create(
                model=llm.engine.model_name,
                prompt=prompt,
                max_tokens=w.output_len,
                temperature=0.0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += 1
            with lock:
                if first is not None:
                    ttfts.append(first - t0)
                if first is not None and last is not None and n > 1:
                    tpots.append((last - first) / (n - 1))
            return n

        t0 = time.perf_counter()
        with ThreadPoolExecutor(w.concurrency) as pool:
            list(pool.map(one, prompts))
        elapsed = time.perf_counter() - t0
    return {
        "server_ttft_p50_s": percentile(ttfts, 50),
        "server_ttft_p99_s": percentile(ttfts, 99),
        "server_tpot_p50_s": percentile(tpots, 50),
        "server_tpot_p99_s": percentile(tpots, 99),
        "server_throughput_tok_s": w.server_requests * w.output_len / elapsed,
    }


# ---------------------------------------------------------------------- baselines


def _load_hf_model(source: Any, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    if source.kind == "gguf":
        return AutoModelForCausalLM.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, dtype=dtype
        ).eval()
    return AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype).eval()


def transformers_runs(
    source: Any,
    vocab: int,
    w: Workload,
    *,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    continuous_batching: bool = True,
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, dict[str, float]]:
    """The same workload through transformers ``generate`` (padded batch) per dtype."""
    import torch

    results: dict[str, dict[str, float]] = {}
    prompts = random_prompts(w.num_requests, w.prompt_len, vocab, w.seed)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        progress(f"transformers {dtype_name}: loading the model")
        model = _load_hf_model(source, dtype)
        out: dict[str, float] = {}

        def generate(batch: list[list[int]], new: int, m: Any = model) -> float:
            ids = torch.tensor(batch)
            mask = torch.ones_like(ids)
            t0 = time.perf_counter()
            with torch.inference_mode():
                m.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                )
            return time.perf_counter() - t0

        warm = min(8, w.output_len)
        generate(prompts, warm)  # the same warm-up as the engine gets
        generate([prompts[0][:16]], warm)
        progress(f"transformers {dtype_name}: throughput")
        out["throughput_tok_s"] = w.num_requests * w.output_len / generate(prompts, w.output_len)
        progress(f"transformers {dtype_name}: batch-1 decode")
        t_one = generate([prompts[0][:16]], 1)
        t_all = generate([prompts[0][:16]], w.decode_len)
        out["decode_b1_tok_s"] = (w.decode_len - 1) / max(t_all - t_one, 1e-9)
        long = random_prompts(1, w.prefill_len, vocab, w.seed + 1)
        out["prefill_tok_s"] = w.prefill_len / generate(long, 1)
        results[f"transformers_{dtype_name}"] = out

        if continuous_batching and dtype_name == dtypes[-1] and hasattr(model, "generate_batch"):
            progress(f"transformers {dtype_name}: continuous batching (generate_batch)")
            try:
                from transformers import GenerationConfig
                from transformers.generation.configuration_utils import (
                    ContinuousBatchingConfig,
                )

                cfg = GenerationConfig(
                    max_new_tokens=w.output_len, do_sample=False, eos_token_id=-1, pad_token_id=0
                )
                # Sized to the workload: unsized, it reserves memory for far more and
                # spends seconds doing so.
                cb = ContinuousBatchingConfig(
                    num_blocks=2 * w.num_requests * (w.prompt_len + w.output_len) // 16 + 16,
                    max_batch_tokens=512,
                )
                t0 = time.perf_counter()
                res = model.generate_batch(
                    inputs=prompts,
                    generation_config=cfg,
                    continuous_batching_config=cb,
                    warmup=False,
                )
                elapsed = time.perf_counter() - t0
                gen = sum(len(getattr(r, "generated_tokens", None) or []) for r in res.values())
                if gen == 0:
                    raise RuntimeError("generate_batch produced no tokens")
                results[f"transformers_cb_{dtype_name}"] = {"throughput_tok_s": gen / elapsed}
            except Exception as exc:  # an experimental API: report, do not fail the run
                progress(f"transformers continuous batching failed: {type(exc).__name__}: {exc}")
        del model
    return results


def llama_cpp_runs(source: Any, w: Workload, threads: int) -> dict[str, float]:
    """Batch-1 decode and prefill through llama-cpp-python (GGUF models only)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(source.path),
        n_ctx=max(2048, w.prefill_len + w.decode_len + 16),
        n_threads=threads,
        n_batch=512,
        verbose=False,
    )
    vocab = llm.n_vocab()
    prompt = random_prompts(1, 16, vocab, w.seed)[0]
    out: dict[str, float] = {}
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(w.decode_len):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    out["decode_b1_tok_s"] = w.decode_len / (time.perf_counter() - t1)
    _ = t0
    long = random_prompts(1, w.prefill_len, vocab, w.seed + 1)[0]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(long)
    out["prefill_tok_s"] = w.prefill_len / (time.perf_counter() - t0)
    return out


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (nan when empty)."""
    return statistics.fmean(values) if values else float("nan")
