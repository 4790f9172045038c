"""Speculative decoding against plain decoding on the same prompts, interleaved.

``python -m sagellm.engine.bench.speculative --speculative-config '{"method": "ngram"}'``
builds one engine with ``speculative_config`` and runs each workload with speculation on
and off in alternation (A B A B ...; off is the same engine with its decoder detached, so
both sides share weights, kernels and KV pool), checks that greedy outputs are
identical token for token, and prints medians and their ratios: batch-1 output tokens/s
on an input-grounded workload (the answer quotes, summarises or edits text given in the
prompt) and on short chat questions, and batch-``--batch`` throughput on the grounded
prompts. The machine is shared: only ratios measured in one run are comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from sagellm.core.types import SamplingParams

__all__ = ["GROUNDED", "CHAT", "main", "measure"]

_PASSAGES = [
    "The old lighthouse stood on a rocky point at the edge of the harbour. Every night its "
    "keeper climbed the ninety steps to the lamp room, trimmed the wick, polished the lens "
    "and wrote the weather in a leather book. Ships coming home in the dark looked for its "
    "light long before they could see the town.",
    "To make bread, mix five hundred grams of flour with ten grams of salt and seven grams "
    "of yeast. Add three hundred and fifty millilitres of warm water and knead the dough "
    "for ten minutes until it is smooth. Leave it to rise for an hour, shape it into a "
    "loaf and bake it at two hundred and twenty degrees for thirty minutes.",
    "The committee met on Tuesday to discuss the new library. Members agreed that the "
    "building should open in the spring, that it should stay open until nine in the "
    "evening, and that the reading room on the first floor should be kept quiet. The "
    "budget will be reviewed again at the next meeting in March.",
    "def total_price(items, tax_rate):\n    subtotal = 0\n    for item in items:\n"
    "        subtotal += item.price * item.quantity\n    tax = subtotal * tax_rate\n"
    "    return subtotal + tax\n",
]

#: Input-grounded requests: the answer copies spans of the prompt.
GROUNDED: list[str] = []
for _p in _PASSAGES:
    GROUNDED.append(f"Repeat the following text exactly, word for word.\n\n{_p}")
    GROUNDED.append(f"Here is a text:\n\n{_p}\n\nRewrite the text above, keeping every sentence.")

#: Chat requests: short questions whose answers are not in the prompt.
CHAT = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "What is a good name for a pet cat?",
    "How do I boil an egg?",
    "Explain what a computer is to a child.",
    "What should I pack for a weekend trip?",
]


def _messages(prompts: Sequence[str]) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def _run(
    llm: Any, prompts: Sequence[str], sampling: SamplingParams, batch: int
) -> tuple[float, list[list[int]]]:
    """Output tokens/s over the prompts, ``batch`` at a time, and the outputs."""
    outs: list[list[int]] = []
    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        res = llm.chat(_messages(prompts[i : i + batch]), sampling)
        for r in res:
            outs.append(list(r.outputs[0].token_ids))
            tokens += len(r.outputs[0].token_ids)
    return tokens / (time.perf_counter() - t0), outs


def measure(
    speculative_config: dict[str, Any],
    *,
    model: str | None = None,
    reps: int = 3,
    max_tokens: int = 96,
    batch: int = 16,
    num_threads: int | None = None,
    num_prompts: int | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Median tokens/s of both engines per workload, their ratios, acceptance and whether
    every greedy output matched."""
    from sagellm.engine.llm import LLM

    opts: dict[str, Any] = {}
    if model is not None:
        opts["model"] = model
    if num_threads is not None:
        opts["num_threads"] = num_threads
    spec = LLM(speculative_config=speculative_config, **opts)
    decoder = spec.engine.speculative
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    grounded, chat = GROUNDED[:num_prompts], CHAT[:num_prompts]
    grounded_batch = (GROUNDED * (-(-batch // len(GROUNDED))))[:batch]
    workloads = {
        "grounded_batch1": (grounded, 1),
        "chat_batch1": (chat, 1),
        f"grounded_batch{batch}": (grounded_batch, batch),
    }

    def side(name: str) -> Any:
        spec.engine.speculative = decoder if name == "spec" else None
        return spec

    # warm both sides (first-call compilation and allocation)
    for name in ("plain", "spec"):
        _run(side(name), GROUNDED[:1], SamplingParams(temperature=0.0, max_tokens=8), 1)
    result: dict[str, Any] = {"speculative_config": speculative_config, "workloads": {}}
    identical = True
    for name, (prompts, b) in workloads.items():
        rates: dict[str, list[float]] = {"plain": [], "spec": []}
        before = decoder.total if decoder else None
        drafted0 = before.num_draft_tokens if before else 0
        accepted0 = before.num_accepted_tokens if before else 0
        chunks0, emitted0 = (before.num_drafts, before.num_emitted_tokens) if before else (0, 0)
        same = True
        for rep in range(reps):
            order = ["plain", "spec"] if rep % 2 == 0 else ["spec", "plain"]
            outs = {}
            for which in order:
                rate, outs[which] = _run(side(which), prompts, sampling, b)
                rates[which].append(rate)
                if log:
                    log(f"{name} rep {rep + 1}/{reps} {which}: {rate:.1f} tok/s")
            same &= outs["plain"] == outs["spec"]
        identical &= same
        total = decoder.total if decoder else None
        drafted = (total.num_draft_tokens - drafted0) if total else 0
        accepted = (total.num_accepted_tokens - accepted0) if total else 0
        chunks = (total.num_drafts - chunks0) if total else 0
        emitted = (total.num_emitted_tokens - emitted0) if total else 0
        med_p, med_s = statistics.median(rates["plain"]), statistics.median(rates["spec"])
        result["workloads"][name] = {
            "plain_tok_s": round(med_p, 2),
            "spec_tok_s": round(med_s, 2),
            "ratio": round(med_s / med_p, 3),
            "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
            "mean_accepted_length": round(emitted / chunks, 3) if chunks else None,
            "draft_tokens": drafted,
            "greedy_identical": same,
        }
    spec.engine.speculative = decoder
    result["greedy_identical"] = identical
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sagellm.engine.bench.speculative", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--speculative-config",
        default='{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}',
        help="JSON as for sagellm serve (default: ngram, k=5)",
    )
    parser.add_argument("--model", help="model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--reps", type=int, default=3, help="alternations per workload")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16, help="batch of the throughput run")
    parser.add_argument("--threads", type=int, dest="num_threads")
    parser.add_argument(
        "--prompts", type=int, dest="num_prompts", help="first N prompts of each batch-1 workload"
    )
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    cfg = json.loads(args.speculative_config)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res = measure(
        cfg,
        model=args.model,
        reps=args.reps,
        max_tokens=args.max_tokens,
        batch=args.batch,
        num_threads=args.num_threads,
        num_prompts=args.num_prompts,
        log=log,
    )
    print(f"speculative_config: {json.dumps(cfg)}")
    print(
        f"{'workload':<20} {'plain tok/s':>12} {'spec tok/s':>12} {'ratio':>7} {'accept':>7} "
        f"{'mean len':>9} {'identical':>9}"
    )
    for name, w in res["workloads"].items():
        acc = "-" if w["acceptance_rate"] is None else f"{w['acceptance_rate']:.2f}"
        mal = "-" if w["mean_accepted_length"] is None else f"{w['mean_accepted_length']:.2f}"
        print(
            f"{name:<20} {w['plain_tok_s']:>12.1f} {w['spec_tok_s']:>12.1f} "
            f"{w['ratio']:>7.2f} {acc:>7} {mal:>9} {str(w['greedy_identical']):>9}"
        )
    print(f"greedy outputs identical: {res['greedy_identical']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["greedy_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
