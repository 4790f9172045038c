"""``python -m sagellm.engine.bench.kernels_ab``: two kernel-provider specs side by side.

Builds one engine per spec in the same process (same model, quantization and threads) and
runs the offline workload of ``sagellm bench`` (throughput of a batch of requests, batch-1
decode, one long prefill) on each in turn, A B A B, for ``--rounds`` rounds; prints each
figure's median per spec, the ratio B / A of the medians and the two-sided sign-test p of
the paired rounds. Example (W8A8 many-row steps against the default bfloat16 ones)::

    python -m sagellm.engine.bench.kernels_ab --a fused --b fused,int8_dense_linear=true \\
        --rounds 3 --num-requests 64 --prompt-len 32

Run it on a quiet machine: anything else running swings single figures by 2x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["compare", "main"]

FIGURES = ("throughput_tok_s", "decode_b1_tok_s", "prefill_tok_s")


def compare(
    engines: dict[str, Any], workload: Any, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Per spec, per figure, the value of every round (specs interleaved in each round)."""
    from sagellm.engine.bench.workloads import sagellm_offline

    runs: dict[str, dict[str, list[float]]] = {k: {f: [] for f in FIGURES} for k in engines}
    for _ in range(rounds):
        for spec, llm in engines.items():
            got = sagellm_offline(llm, workload)
            for f in FIGURES:
                if f in got:
                    runs[spec][f].append(got[f])
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="baseline kernel spec, NAME[,key=value...]")
    parser.add_argument("--b", required=True, help="kernel spec compared with it")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.a == args.b:
        parser.error("--a and --b name the same spec; give two different ones")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    from sagellm.engine import LLM
    from sagellm.engine.bench.stats import sign_test
    from sagellm.engine.bench.workloads import Workload

    engines = {
        spec: LLM(
            model=args.model,
            quantization=args.quantization,
            num_threads=args.threads,
            kernels=spec,
        )
        for spec in (args.a, args.b)
    }
    workload = Workload(
        num_requests=args.num_requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        prefill_len=args.prefill_len,
    )
    runs = compare(engines, workload, args.rounds)
    rows = []
    for f in FIGURES:
        a, b = runs[args.a][f], runs[args.b][f]
        if not a or not b:
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        rows.append(
            {
                "figure": f,
                "a": ma,
                "b": mb,
                "ratio": mb / ma,
                "sign_p": sign_test(b, a) if len(a) == len(b) else float("nan"),
                "a_runs": a,
                "b_runs": b,
            }
        )
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "rounds": args.rounds, "figures": rows}))
        return 0
    print(f"A = {args.a}\nB = {args.b}\n{args.rounds} rounds, A B interleaved, medians")
    print(f"{'figure':<18} {'A':>10} {'B':>10} {'B/A':>7} {'sign p':>7}")
    for r in rows:
        print(
            f"{r['figure']:<18} {r['a']:10.1f} {r['b']:10.1f} {r['ratio']:6.2f}x {r['sign_p']:7.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
