"""Overhead of structured outputs: constrained against unconstrained batches, same run.

Each round generates ``--num-requests`` completions at once twice, in alternating order
(A B, then B A): once free (``ignore_eos``) and once under a JSON schema whose output is
long enough to fill ``--max-tokens``. Output tokens per second of each side, their
medians over the rounds and the ratio are printed as JSON.

Run::

    python -m sagellm.engine.bench.structured --model smollm2-135m --num-requests 16 \
        --max-tokens 64 --rounds 3

Anchor: vLLM's structured-output benchmark (``benchmark_serving_structured_output.py``)
reports the same throughput ratio against unconstrained requests; this one runs offline
through :class:`~sagellm.engine.llm.LLM` so only the engine's cost is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from sagellm.engine.structured import SamplingParams, StructuredOutput

__all__ = ["SCHEMA", "main", "run"]

#: Long enough that every completion runs to max_tokens under the grammar.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z]{4,12}$"},
                    "count": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["name", "count"],
            },
            "minItems": 16,
            "maxItems": 16,
        }
    },
    "required": ["items"],
}

_PROMPT = "List sixteen fruits with a count for each, as JSON: "


def _once(llm: Any, num_requests: int, params: SamplingParams) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = llm.generate([_PROMPT] * num_requests, params)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(c.token_ids) for o in outs for c in o.outputs)


def run(llm: Any, *, num_requests: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    """Tokens/s of both sides per round, medians and the constrained/free ratio."""
    free = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    constrained = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        structured_output=StructuredOutput.model_validate({"json": SCHEMA}),
    )
    _once(llm, 2, constrained)  # compile the grammar and warm up outside the timing
    rates: dict[str, list[float]] = {"free": [], "constrained": []}
    for r in range(rounds):
        order = [("free", free), ("constrained", constrained)]
        for name, params in order if r % 2 == 0 else order[::-1]:
            seconds, tokens = _once(llm, num_requests, params)
            rates[name].append(tokens / seconds)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "num_requests": num_requests,
        "max_tokens": max_tokens,
        "tokens_per_s": rates,
        "median_tokens_per_s": med,
        "constrained_over_free": med["constrained"] / med["free"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)
    from sagellm.engine.llm import LLM

    options = {"dtype": args.dtype} if args.dtype else {}
    llm = LLM(model=args.model, **options)
    result = run(
        llm, num_requests=args.num_requests, max_tokens=args.max_tokens, rounds=args.rounds
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
