"""Lookup and insert latency of the prefix indexes next to a naive linear scan.

``python -m sagellm.prefix_cache.bench`` builds, from one seed, a cache of 10,000
prefixes of 2,048 tokens (block size 16) shaped like serving traffic: 100 system prompts
of 1,024 tokens, each followed by 10 few-shot templates of 512 tokens, each followed by
10 questions of 512 tokens. It fills a :class:`RadixPrefixIndex`, a
:class:`BlockHashPrefixIndex` and the :class:`LinearScanPrefixIndex` baseline with the
same prefixes, replays the same lookups on all three (cached conversations, new questions
on a cached template, new templates on a cached system prompt, unknown prompts), checks
that they agree on every match, and prints p50/p99 latencies and the speedups.
The asv suite in ``benchmarks/`` uses the same functions.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sagellm.prefix_cache.baseline import LinearScanPrefixIndex
from sagellm.prefix_cache.block_hash import BlockHashPrefixIndex
from sagellm.prefix_cache.radix import RadixPrefixIndex

__all__ = [
    "KINDS",
    "PrefixWorkload",
    "build_index",
    "format_table",
    "main",
    "measure",
    "percentile",
    "run",
]

#: Index kinds compared, the baseline last.
KINDS = ("radix", "block_hash", "naive")

_VOCAB = list(range(49152))  # shared int objects: token tuples cost 8 bytes per token


def _tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.choices(_VOCAB, k=n))


@dataclass
class PrefixWorkload:
    """Seeded prefixes (system prompt + template + question) and lookups over them."""

    num_systems: int = 100
    num_templates: int = 10  # per system prompt
    num_questions: int = 10  # per template
    system_len: int = 1024
    template_len: int = 512
    question_len: int = 512
    block_size: int = 16
    seed: int = 0
    systems: list[tuple[int, ...]] = field(init=False, repr=False)
    templates: list[list[tuple[int, ...]]] = field(init=False, repr=False)
    questions: list[list[list[tuple[int, ...]]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.systems = [_tokens(rng, self.system_len) for _ in range(self.num_systems)]
        self.templates = [
            [_tokens(rng, self.template_len) for _ in range(self.num_templates)]
            for _ in range(self.num_systems)
        ]
        self.questions = [
            [
                [_tokens(rng, self.question_len) for _ in range(self.num_questions)]
                for _ in range(self.num_templates)
            ]
            for _ in range(self.num_systems)
        ]

    @property
    def num_prefixes(self) -> int:
        """Cached sequences."""
        return self.num_systems * self.num_templates * self.num_questions

    @property
    def prefix_len(self) -> int:
        """Tokens per cached sequence."""
        return self.system_len + self.template_len + self.question_len

    def prefix(self, s: int, t: int, q: int) -> tuple[int, ...]:
        """The cached sequence of system ``s``, template ``t``, question ``q``."""
        return self.systems[s] + self.templates[s][t] + self.questions[s][t][q]

    def prefixes(self) -> Iterator[tuple[int, ...]]:
        """Every cached sequence, in insertion order."""
        for s in range(self.num_systems):
            for t in range(self.num_templates):
                for q in range(self.num_questions):
                    yield self.prefix(s, t, q)

    def queries(self, num: int, seed: int = 1) -> list[tuple[int, ...]]:
        """Lookups: 40% a cached sequence plus a new partial turn, 30% a new question on a
        cached template, 20% a new template on a cached system prompt, 10% unknown."""
        rng = random.Random(seed)
        out = []
        for _ in range(num):
            s = rng.randrange(self.num_systems)
            t = rng.randrange(self.num_templates)
            r = rng.random()
            if r < 0.4:
                q = rng.randrange(self.num_questions)
                out.append(self.prefix(s, t, q) + _tokens(rng, 7))
            elif r < 0.7:
                out.append(self.systems[s] + self.templates[s][t] + _tokens(rng, self.question_len))
            elif r < 0.9:
                out.append(self.systems[s] + _tokens(rng, self.template_len + self.question_len))
            else:
                out.append(_tokens(rng, self.prefix_len))
        return out

    def fresh_sequences(self, num: int, seed: int = 2) -> list[tuple[int, ...]]:
        """New sequences to insert: a cached system prompt and template, a new question."""
        rng = random.Random(seed)
        out = []
        for _ in range(num):
            s = rng.randrange(self.num_systems)
            t = rng.randrange(self.num_templates)
            out.append(self.systems[s] + self.templates[s][t] + _tokens(rng, self.question_len))
        return out


def build_index(kind: str, workload: PrefixWorkload) -> Any:
    """An index of ``kind`` holding every prefix of ``workload`` (fresh block ids)."""
    bs = workload.block_size
    if kind == "radix":
        index: Any = RadixPrefixIndex(block_size=bs)
    elif kind == "block_hash":
        index = BlockHashPrefixIndex(block_size=bs)
    elif kind == "naive":
        index = LinearScanPrefixIndex(block_size=bs)
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    blocks_per_prefix = workload.prefix_len // bs
    next_id = 0
    for tokens in workload.prefixes():
        ids = range(next_id, next_id + blocks_per_prefix)
        next_id += blocks_per_prefix
        index.insert(tokens, ids)
    return index


def percentile(samples: list[int], q: float) -> float:
    """Nearest-rank quantile of nanosecond samples, in microseconds."""
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(q * len(ordered))))
    return ordered[rank - 1] / 1000.0


def time_lookups(index: Any, queries: list[tuple[int, ...]]) -> tuple[list[int], list[int]]:
    """Latency (ns) and matched tokens of every lookup, timed around ``match``."""
    times, matched = [], []
    clock = time.perf_counter_ns
    for q in queries:
        t0 = clock()
        m = index.match(q)
        times.append(clock() - t0)
        matched.append(m.num_tokens)
    return times, matched


def time_inserts(index: Any, sequences: list[tuple[int, ...]], first_block_id: int) -> list[int]:
    """Latency (ns) of inserting every sequence with fresh block ids."""
    times = []
    clock = time.perf_counter_ns
    next_id = first_block_id
    for seq in sequences:
        n = len(seq) // index.block_size
        ids = range(next_id, next_id + n)
        next_id += n
        t0 = clock()
        index.insert(seq, ids)
        times.append(clock() - t0)
    return times


def measure(
    workload: PrefixWorkload,
    num_queries: int = 2000,
    num_naive_queries: int = 100,
    num_inserts: int = 500,
    kinds: tuple[str, ...] = KINDS,
) -> dict[str, dict[str, float]]:
    """Build each index, replay the lookups and inserts, return figures per kind.

    The naive scan replays only the first ``num_naive_queries`` lookups (it is slow);
    every index must agree with the others on the tokens matched by each lookup.
    """
    queries = workload.queries(num_queries)
    fresh = workload.fresh_sequences(num_inserts)
    first_new_id = workload.num_prefixes * (workload.prefix_len // workload.block_size)
    results: dict[str, dict[str, float]] = {}
    reference: list[int] | None = None
    for kind in kinds:
        gc.collect()
        t0 = time.perf_counter()
        index = build_index(kind, workload)
        build_s = time.perf_counter() - t0
        qs = queries[:num_naive_queries] if kind == "naive" else queries
        gc.disable()  # a collection inside one lookup would be noise, not index cost
        try:
            lookup_ns, matched = time_lookups(index, qs)
            insert_ns = time_inserts(index, fresh, first_new_id)
        finally:
            gc.enable()
        if reference is None:
            reference = matched
        n = min(len(reference), len(matched))
        if matched[:n] != reference[:n]:
            raise AssertionError(f"{kind} disagrees with {kinds[0]} on matched tokens")
        results[kind] = {
            "build_s": build_s,
            "lookup_p50_us": percentile(lookup_ns, 0.5),
            "lookup_p99_us": percentile(lookup_ns, 0.99),
            "insert_p50_us": percentile(insert_ns, 0.5),
            "insert_p99_us": percentile(insert_ns, 0.99),
            "hit_rate": sum(matched) / sum(len(q) for q in qs),
            "num_lookups": float(len(qs)),
        }
        del index
    return results


def run(quick: bool = False, seed: int = 0) -> tuple[PrefixWorkload, dict[str, dict[str, float]]]:
    """The default comparison (``quick``: 10x fewer prefixes, for smoke tests)."""
    if quick:
        workload = PrefixWorkload(num_systems=10, seed=seed)
        return workload, measure(workload, num_queries=300, num_naive_queries=50, num_inserts=50)
    workload = PrefixWorkload(seed=seed)
    return workload, measure(workload)


def format_table(workload: PrefixWorkload, results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of the figures with speedups over the naive scan."""
    naive = results.get("naive")
    lines = [
        f"{workload.num_prefixes} cached prefixes x {workload.prefix_len} tokens, "
        f"block size {workload.block_size}, seed {workload.seed}",
        "",
        "| index | build s | lookup p50 us | lookup p99 us | insert p50 us | insert p99 us "
        "| hit rate | p50 speedup vs naive | p99 speedup vs naive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        if naive is not None and kind != "naive":
            s50 = f"{naive['lookup_p50_us'] / r['lookup_p50_us']:.0f}x"
            s99 = f"{naive['lookup_p99_us'] / r['lookup_p99_us']:.0f}x"
        else:
            s50 = s99 = "1x" if kind == "naive" else "-"
        lines.append(
            f"| {kind} | {r['build_s']:.2f} | {r['lookup_p50_us']:.1f} | "
            f"{r['lookup_p99_us']:.1f} | {r['insert_p50_us']:.1f} | {r['insert_p99_us']:.1f} | "
            f"{r['hit_rate']:.3f} | {s50} | {s99} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the comparison table."""
    parser = argparse.ArgumentParser(
        prog="python -m sagellm.prefix_cache.bench",
        description="Prefix index lookup/insert latency vs a naive linear scan.",
    )
    parser.add_argument("--quick", action="store_true", help="1,000 prefixes instead of 10,000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workload, results = run(quick=args.quick, seed=args.seed)
    print(format_table(workload, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
