"""Engine clocks: the real clocks, and a replay clock on which steps cost what a model says.

:class:`LLMEngine` reads time through a clock object. :class:`RealClock` (the default) is
``time.monotonic`` for arrivals and token times and ``time.perf_counter`` around a step.
:class:`ReplayClock` is virtual: after a step is computed it advances by the
:class:`StepCostPredictor` estimate for that step's shape and reports that estimate as the
step's duration, so the schedulers' cost models see the same virtual durations. A
workload's schedule (admissions, TTFT, TPOT, SLO attainment) then depends only on the
workload and the policy, never on what else the machine is doing — the idea of
simulating serving on a calibrated per-iteration cost model (Vidur, DistServe's
simulator), applied to the real engine loop.

Usage::

    clock = ReplayClock(StepCostPredictor.load("calib.json"))
    engine.set_clock(clock)  # the scheduler reads clock.now too
    clock.jump_to(clock.now() + 0.5)  # idle until the next arrival, without sleeping
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sagellm.core.errors import SageLLMError

__all__ = [
    "FEATURES",
    "RealClock",
    "ReplayClock",
    "StepCostPredictor",
    "StepShape",
    "cpu_model_name",
]

#: Names of the predictor's coefficients, in the order of :meth:`StepShape.features`.
FEATURES = (
    "intercept",
    "prefill_tokens",
    "decode_rows",
    "attention_kpairs",
    # the two regimes of a quantized model's projections (see StepShape.features): the
    # fixed cost of a step on the float product, the extra cost per row on the blocks
    "dense_step",
    "block_rows",
)
#: The first four: what a calibration made before the regimes had (the rest are 0).
_BASE_FEATURES = 4


@dataclass(frozen=True, slots=True)
class StepShape:
    """What a step computes, as far as its cost goes (from its ``SchedulerOutput``)."""

    prefill_tokens: int  # tokens of prompt chunks (and recomputations)
    decode_rows: int  # decoding requests (one token, or one plus drafts, each)
    decode_tokens: int  # tokens of the decode rows (drafts included)
    attention_pairs: int  # query x key positions of the step's attention, all rows

    @classmethod
    def of(cls, out: Any) -> StepShape:
        """The shape of scheduler output ``out`` (anything with ``chunks`` of
        ``ScheduledChunk``)."""
        prefill = rows = decode = pairs = 0
        for c in out.chunks:
            n = len(c.token_ids)
            if c.is_prefill:
                prefill += n
            else:
                rows += 1
                decode += n
            # causal attention: query i of the chunk sees num_computed + i + 1 keys
            pairs += n * c.num_computed_tokens + n * (n + 1) // 2
        return cls(prefill, rows, decode, pairs)

    def features(self, dense_rows: int = 0) -> tuple[float, ...]:
        """The regressors of :data:`FEATURES` (draft tokens count as prefill-like tokens).

        ``dense_rows``: from how many rows the engine's quantized projections switch from
        their few-row block kernels to the float product (0: no switch). A step of fewer
        rows pays per row on the blocks (``block_rows``); a step of more pays the float
        product's fixed cost (``dense_step``, the bf16 weights read once): a cost that a
        single line in the row count cannot follow (4-5 block rows cost more than 6 dense
        ones on a 2-core Xeon).
        """
        extra = self.decode_tokens - self.decode_rows
        tokens = self.prefill_tokens + self.decode_tokens
        dense = 1.0 if dense_rows and tokens >= dense_rows else 0.0
        few = float(self.decode_rows) if dense_rows and tokens < dense_rows else 0.0
        return (1.0, float(self.prefill_tokens + extra), float(self.decode_rows),
                self.attention_pairs / 1000.0, dense, few)  # fmt: skip


def cpu_model_name() -> str:
    """The CPU model as the OS names it ("" when unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@dataclass(frozen=True)
class StepCostPredictor:
    """Seconds of one engine step, linear in :data:`FEATURES` (fitted by
    :meth:`fit` from timed steps of one machine and model)."""

    coefficients: tuple[float, ...]  # seconds per unit of each feature, FEATURES order
    model: str = ""  # model the timings came from
    num_threads: int = 0  # torch threads of the timed engine
    cpu: str = ""  # CPU model name of the timed machine
    engine_options: dict[str, Any] | None = None  # options of the timed engine
    residual: float = 0.0  # median relative error of the fit on its own samples
    dense_rows: int = 0  # rows from which the projections take the float product (0: none)

    def __post_init__(self) -> None:
        coef = tuple(self.coefficients)
        if len(coef) == _BASE_FEATURES:  # a predictor without the regimes
            object.__setattr__(self, "coefficients", coef + (0.0,) * (len(FEATURES) - len(coef)))
        elif len(coef) != len(FEATURES):
            raise ValueError(f"expected {len(FEATURES)} coefficients, got {self.coefficients}")

    def predict(self, shape: StepShape) -> float:
        """Predicted seconds of a step of ``shape`` (0 for a step that computes nothing)."""
        if not (shape.prefill_tokens or shape.decode_rows):
            return 0.0
        features = shape.features(self.dense_rows)
        return max(0.0, sum(c * f for c, f in zip(self.coefficients, features)))

    def prefill_seconds(self, num_tokens: int, chunk: int) -> float:
        """Predicted seconds to prefill ``num_tokens`` alone in chunks of ``chunk``."""
        total, done = 0.0, 0
        while done < num_tokens:
            n = min(chunk, num_tokens - done)
            total += self.predict(StepShape(n, 0, 0, n * done + n * (n + 1) // 2))
            done += n
        return total

    def decode_seconds(self, num_rows: int, context: int) -> float:
        """Predicted seconds of a decode step of ``num_rows`` rows at ``context`` tokens."""
        return self.predict(StepShape(0, num_rows, num_rows, num_rows * (context + 1)))

    @classmethod
    def fit(
        cls, samples: Sequence[tuple[StepShape, float]], dense_rows: int = 0, **meta: Any
    ) -> StepCostPredictor:
        """Least squares with non-negative coefficients (a feature whose coefficient comes
        out negative is dropped and the rest refitted) on ``(shape, seconds)`` samples.

        Raises ValueError with fewer samples than coefficients.
        """
        import numpy as np

        if len(samples) < len(FEATURES):
            raise ValueError(
                f"fitting {len(FEATURES)} coefficients needs at least that many timed steps; "
                f"got {len(samples)}"
            )
        x = np.array([s.features(dense_rows) for s, _ in samples], dtype=np.float64)
        y = np.array([t for _, t in samples], dtype=np.float64)
        # relative error matters (a 2 ms decode step as much as a 200 ms prefill)
        w = 1.0 / np.maximum(y, 1e-6)
        active = list(range(len(FEATURES)))
        coef = np.zeros(len(FEATURES))
        while active:
            sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
            if (sol >= 0).all():
                coef[:] = 0.0
                coef[active] = sol
                break
            active.pop(int(np.argmin(sol)))
        pred = x @ coef
        residual = float(np.median(np.abs(pred - y) / np.maximum(y, 1e-9)))
        return cls(tuple(float(c) for c in coef), residual=residual, dense_rows=dense_rows, **meta)

    def to_json(self) -> dict[str, Any]:
        """The predictor as JSON data (coefficients by feature name)."""
        d = asdict(self)
        d["coefficients"] = dict(zip(FEATURES, self.coefficients))
        return d

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StepCostPredictor:
        """Read a predictor saved by :meth:`save`; a missing or malformed file raises
        SageLLMError that says how to make one."""
        how = (
            "make one with `python -m sagellm.engine.bench.replay calibrate --model MODEL "
            "--threads N --out FILE.json`"
        )
        try:
            data = json.loads(Path(path).read_text())
            coef = data["coefficients"]
            values = tuple(float(coef[name]) for name in FEATURES[:_BASE_FEATURES]) + tuple(
                float(coef.get(name, 0.0)) for name in FEATURES[_BASE_FEATURES:]
            )
        except FileNotFoundError:
            raise SageLLMError(f"no step-cost calibration at {path}: {how}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SageLLMError(f"{path} is not a step-cost calibration ({exc}): {how}") from exc
        return cls(
            values,
            model=str(data.get("model", "")),
            num_threads=int(data.get("num_threads", 0)),
            cpu=str(data.get("cpu", "")),
            engine_options=data.get("engine_options"),
            residual=float(data.get("residual", 0.0)),
            dense_rows=int(data.get("dense_rows", 0)),
        )


class RealClock:
    """The engine's default clock: ``time.monotonic`` for arrivals and token times,
    ``time.perf_counter`` for step durations."""

    #: True for a clock whose time is not the machine's (nothing to sleep for).
    virtual = False

    def now(self) -> float:
        """Current time in seconds (the clock of ``GenerationRequest.arrival_time``)."""
        return time.monotonic()

    def start_step(self) -> float:
        """Called when a step begins; returns the mark :meth:`step_seconds` measures from."""
        return time.perf_counter()

    def advance(self, out: Any) -> None:
        """Called once a step's compute is done, before the scheduler sees its output."""

    def step_seconds(self, mark: float) -> float:
        """Seconds since :meth:`start_step` returned ``mark``."""
        return time.perf_counter() - mark


class ReplayClock(RealClock):
    """A virtual clock that a step advances by its predicted cost.

    ``now()`` starts at ``start`` and moves only through :meth:`advance` (by
    ``predictor.predict(StepShape.of(out))``) and :meth:`jump_to`; wall time never enters.
    """

    virtual = True

    def __init__(self, predictor: StepCostPredictor, start: float = 0.0) -> None:
        self.predictor = predictor
        self._now = float(start)
        self.num_steps = 0
        self.busy_seconds = 0.0  # virtual seconds spent in steps
        self._step = 0.0  # predicted seconds of the step in progress

    def now(self) -> float:
        return self._now

    def start_step(self) -> float:
        self._step = 0.0
        return self._now

    def advance(self, out: Any) -> None:
        dt = self.predictor.predict(StepShape.of(out))
        self._step += dt
        self._now += dt
        self.busy_seconds += dt
        self.num_steps += 1

    def step_seconds(self, mark: float) -> float:
        # the prediction itself (not a difference of clock readings: exact)
        return self._step

    def jump_to(self, t: float) -> None:
        """Move the clock forward to ``t`` (an idle engine waiting for an arrival)."""
        if not math.isfinite(t):
            raise ValueError(f"cannot jump to {t}")
        self._now = max(self._now, float(t))
