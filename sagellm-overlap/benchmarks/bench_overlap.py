"""asv benchmarks of sagellm.overlap.

``SplitSuite`` times the plan split (it runs every step on the scheduler's path).
``OverlapSuite`` runs the four-way measurement on two gloo ranks once per parameter set
and tracks the hidden share and the speedup over the serialised step, side by side with
the serialised baseline in the same run (ratios, not absolute times, since the machines
are shared).
"""

from __future__ import annotations

from typing import Any

from sagellm.core.testing.overlap import make_plan
from sagellm.overlap import split_plan
from sagellm.overlap.launch import run_ranks
from sagellm.overlap.programs import Workload, measure, overlap_metrics


class SplitSuite:
    params = ([2, 4], [16, 256])
    param_names = ["num_micro_batches", "num_decode"]

    def setup(self, num_micro_batches: int, num_decode: int) -> None:
        self.plan = make_plan([(512, True, 1), (64, True, 1)], [1] * num_decode)

    def time_split(self, num_micro_batches: int, num_decode: int) -> None:
        split_plan(self.plan, num_micro_batches)


class OverlapSuite:
    params = ([256],)
    param_names = ["num_tokens"]
    timeout = 300
    number = 1
    repeat = 1

    def setup_cache(self) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for tokens in self.params[0]:
            w = Workload(num_layers=4, hidden_size=512, ffn_size=2048, num_tokens=tokens)
            per_rank = run_ranks(2, measure, w, 5, timeout_s=240)
            t = {k: max(r[k] for r in per_rank) for k in per_rank[0] if k != "reps"}
            out[tokens] = {**t, **overlap_metrics(t)}
        return out

    def track_hidden_share(self, cache: dict[int, dict[str, Any]], num_tokens: int) -> float:
        return float(cache[num_tokens]["hidden"])

    track_hidden_share.unit = "fraction"  # type: ignore[attr-defined]

    def track_speedup_vs_serialised(
        self, cache: dict[int, dict[str, Any]], num_tokens: int
    ) -> float:
        return float(cache[num_tokens]["speedup"])

    track_speedup_vs_serialised.unit = "x"  # type: ignore[attr-defined]

    def track_idle_share(self, cache: dict[int, dict[str, Any]], num_tokens: int) -> float:
        return float(cache[num_tokens]["idle_overlap"])

    track_idle_share.unit = "fraction"  # type: ignore[attr-defined]
