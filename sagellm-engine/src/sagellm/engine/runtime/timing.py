"""Throughput of a runtime alone (no scheduler, no sampling): decode and prefill tok/s.

Usage::

    python -m sagellm.engine.runtime.timing --model smollm2-135m --dtype bfloat16 --threads 2

Plans are built by hand over a PagedKVPool; each figure is the median of a few timed
repetitions after a warm-up. Decode runs ``batch`` requests whose contexts start at
``context`` tokens and grow by one per step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from sagellm.core.types import ExecutionPlan, IRGraph, IRNode, IRNodeKind, SequenceChunk

__all__ = ["RuntimeTimings", "time_decode", "time_prefill"]


@dataclass(frozen=True)
class RuntimeTimings:
    """Tokens per second of one measurement."""

    what: str
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def _plan(kind: IRNodeKind, chunks: list[SequenceChunk]) -> ExecutionPlan:
    node = IRNode(0, kind, chunks=tuple(chunks))
    return ExecutionPlan(0, IRGraph((node,)), tuple(c.request_id for c in chunks))


def _pool(runtime, num_tokens: int, block_size: int):
    from sagellm.kv_pool.config import PagedKVPoolConfig
    from sagellm.kv_pool.paged import PagedKVPool

    schema = runtime.kv_cache_schema(block_size)
    pool = PagedKVPool(
        PagedKVPoolConfig(num_blocks=schema.num_blocks_for(num_tokens) + 8), schema=schema
    )
    runtime.bind_kv_pool(pool)
    return pool


def time_prefill(
    runtime, num_tokens: int = 512, repeats: int = 3, block_size: int = 16
) -> RuntimeTimings:
    """One request's prompt of ``num_tokens`` in one chunk (logits of the last position)."""
    pool = _pool(runtime, num_tokens, block_size)
    vocab = runtime.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = tuple(torch.randint(3, vocab, (num_tokens,), generator=g).tolist())
    blocks = tuple(pool.allocate(pool.schema.num_blocks_for(num_tokens)))
    plan = _plan(IRNodeKind.PREFILL_CHUNK, [SequenceChunk("p", tokens, 0, blocks, True)])
    runtime.execute(plan)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runtime.execute(plan)
        times.append(time.perf_counter() - t0)
    return RuntimeTimings(f"prefill {num_tokens}", num_tokens, statistics.median(times))


def time_decode(
    runtime, batch: int = 1, context: int = 128, steps: int = 32, block_size: int = 16
) -> RuntimeTimings:
    """``steps`` decode steps of ``batch`` requests (prompts of ``context`` tokens)."""
    per_request = -(-(context + steps + 1) // block_size) * block_size
    pool = _pool(runtime, batch * per_request, block_size)
    vocab = runtime.model_config.vocab_size
    g = torch.Generator().manual_seed(1)
    tables = []
    for b in range(batch):
        blocks = tuple(pool.allocate(pool.schema.num_blocks_for(context + steps + 1)))
        tokens = tuple(torch.randint(3, vocab, (context,), generator=g).tolist())
        runtime.execute(
            _plan(IRNodeKind.PREFILL_CHUNK, [SequenceChunk(f"r{b}", tokens, 0, blocks, False)])
        )
        tables.append(blocks)
    next_ids = [5] * batch

    def step(pos: int) -> None:
        chunks = [
            SequenceChunk(f"r{b}", (next_ids[b],), pos, tables[b], True) for b in range(batch)
        ]
        out = runtime.execute(_plan(IRNodeKind.DECODE_BATCH, chunks))
        next_ids[:] = out.logits.argmax(-1).tolist()

    step(context)  # warm-up
    t0 = time.perf_counter()
    for i in range(1, steps):
        step(context + i)
    seconds = time.perf_counter() - t0
    return RuntimeTimings(f"decode batch={batch} ctx={context}", batch * (steps - 1), seconds)


def time_transformers(
    source, dtype: torch.dtype, batches: list[int], context: int, steps: int, prefill: int
) -> list[RuntimeTimings]:
    """The same measurements on transformers' model (forward with its KV cache, greedy)."""
    from transformers import AutoModelForCausalLM

    if source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    out: list[RuntimeTimings] = []
    with torch.inference_mode():
        for b in batches:
            ids = torch.randint(3, vocab, (b, context), generator=g)
            res = model(ids, use_cache=True)
            cache = res.past_key_values
            nxt = res.logits[:, -1].argmax(-1, keepdim=True)
            res = model(nxt, past_key_values=cache, use_cache=True)  # warm-up step
            nxt = res.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(1, steps):
                res = model(nxt, past_key_values=res.past_key_values, use_cache=True)
                nxt = res.logits[:, -1].argmax(-1, keepdim=True)
            seconds = time.perf_counter() - t0
            out.append(RuntimeTimings(f"decode batch={b} ctx={context}", b * (steps - 1), seconds))
        if prefill:
            ids = torch.randint(3, vocab, (1, prefill), generator=g)
            model(ids)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(ids, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
            out.append(RuntimeTimings(f"prefill {prefill}", prefill, statistics.median(times)))
    return out


def main(argv: list[str] | None = None) -> None:
    from sagellm.engine.models.source import resolve_model
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--vs-transformers", action="store_true", help="measure transformers alongside")
    args = ap.parse_args(argv)
    rt = NativeRuntime(
        NativeRuntimeConfig(model=args.model, dtype=args.dtype, num_threads=args.threads)
    )
    dtype = rt.dtype
    name = str(dtype).removeprefix("torch.")
    print(f"{rt.source.name} {name} threads={torch.get_num_threads()} load {rt.load_seconds:.1f} s")
    ours = [time_decode(rt, batch=b, context=args.context, steps=args.steps) for b in args.batch]
    if args.prefill:
        ours.append(time_prefill(rt, args.prefill))
    theirs: list[RuntimeTimings | None] = [None] * len(ours)
    if args.vs_transformers:
        del rt
        theirs = list(
            time_transformers(
                resolve_model(args.model),
                dtype,
                args.batch,
                args.context,
                args.steps,
                args.prefill,
            )
        )
    for r, t in zip(ours, theirs):
        line = f"{r.what}: {r.tokens_per_second:.1f} tok/s"
        if t is not None:
            ratio = r.tokens_per_second / t.tokens_per_second
            line += f" | transformers {t.tokens_per_second:.1f} tok/s | ratio {ratio:.2f}x"
        print(line)


if __name__ == "__main__":
    main()
