"""Self-consistency on the engine's model: early stopping against the full-budget vote.

``python -m sagellm.engine.cot_eval [--questions 50] [--n 16] [--window 4]`` asks short
arithmetic questions (a three-shot prompt: "Question: What is 3 + 4?" / "Answer: 3 + 4 =
7."), draws ``n`` samples of each at temperature 0.7 in one batch, and replays each stopping rule over the same samples in their order (the
engine's windows draw exactly these samples: sample ``i`` has the same seed whatever the
window). It prints, per rule, the agreement of its vote with the full-budget vote and the
tokens it sampled, as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

from sagellm.core import registry
from sagellm.core.types import SamplingParams

#: The worked examples before each question.
SHOTS = (
    "Question: What is 2 + 5?\nAnswer: 2 + 5 = 7.\n\n"
    "Question: What is 9 - 3?\nAnswer: 9 - 3 = 6.\n\n"
    "Question: What is 4 + 4?\nAnswer: 4 + 4 = 8.\n\n"
)


def questions(num: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, expected answer) pairs of one-digit sums and differences."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if rng.random() < 0.5:
            q, truth = f"What is {a} + {b}?", a + b
        else:
            a, b = max(a, b), min(a, b)
            q, truth = f"What is {a} - {b}?", a - b
        out.append((f"{SHOTS}Question: {q}\nAnswer:", str(truth)))
    return out


def replay(
    rule: Any, answers: list[str | None], lengths: list[int], window: int
) -> tuple[Any, int]:
    """The rule's vote over ``answers`` drawn window by window, and the tokens it sampled."""
    n = len(answers)
    drawn = 0
    while True:
        drawn = min(n, drawn + window)
        vote = rule.vote(answers[:drawn], n)
        if vote.stop:
            return vote, sum(lengths[:drawn])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=50)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from sagellm.engine.llm import LLM

    llm = LLM(model=args.model, seed=args.seed)
    qs = questions(args.questions, args.seed)
    sp = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=("\n",),
    )
    t0 = time.perf_counter()
    outs = llm.generate([q for q, _ in qs], sp)
    seconds = time.perf_counter() - t0
    rules = {
        "majority": registry.load("sagellm.cot", "majority"),
        "esc": registry.load("sagellm.cot", "esc", {"window": args.window}),
        "adaptive": registry.load("sagellm.cot", "adaptive"),
    }
    extract = rules["majority"].extract_answer
    report: dict[str, Any] = {
        "model": args.model,
        "questions": len(qs),
        "n": args.n,
        "window": args.window,
        "temperature": args.temperature,
        "generate_seconds": round(seconds, 1),
    }
    full_votes = []
    per_rule: dict[str, dict[str, float]] = {}
    rows = []
    for (_, truth), out in zip(qs, outs):
        answers = [extract(c.text) for c in out.outputs]
        lengths = [len(c.token_ids) for c in out.outputs]
        rows.append((truth, answers, lengths))
    for name, rule in rules.items():
        agree = correct = tokens = full_tokens = samples = 0
        for i, (truth, answers, lengths) in enumerate(rows):
            vote, used = replay(rule, answers, lengths, args.window if name != "adaptive" else 1)
            if name == "majority":
                full_votes.append(vote.answer)
            agree += vote.answer == full_votes[i]
            correct += vote.answer == truth
            tokens += used
            full_tokens += sum(lengths)
            samples += vote.num_samples
        per_rule[name] = {
            "agreement": round(agree / len(rows), 4),
            "accuracy": round(correct / len(rows), 4),
            "tokens_sampled": tokens,
            "tokens_saved": round(1 - tokens / full_tokens, 4),
            "mean_samples": round(samples / len(rows), 2),
        }
    report["rules"] = per_rule
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
