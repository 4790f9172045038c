"""Seeded request streams shaped like public serving traces (generated, never downloaded).

- :func:`mixed_trace`: long-prompt and short chat requests on Poisson arrivals (the
  goodput benchmark's original workload).
- :func:`bursty_trace`: BurstGPT-like: Gamma-distributed inter-arrival times with shape
  ``burstiness`` < 1 (coefficient of variation ``1/sqrt(burstiness)`` > 1: bursts and
  lulls around the same mean rate) and lognormal prompt and response lengths.
- :func:`diurnal_trace`: a Poisson process whose rate follows a sinusoid
  ``rate * (1 + amplitude * sin(2 pi t / period))`` (drawn by thinning), with a
  Mooncake-trace-like mix in which a share of requests carries a long context.

Every generator is a pure function of its arguments and ``seed``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["TraceRequest", "bursty_trace", "diurnal_trace", "mixed_trace"]


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a generated trace."""

    arrival: float  # seconds after the trace starts
    prompt_len: int  # prompt tokens
    output_len: int  # tokens to generate
    kind: str  # "long" or "short": the request's class (tenant and priority in benchmarks)


def _lognormal_len(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))


def mixed_trace(
    seed: int,
    *,
    num_long: int = 12,
    num_short: int = 36,
    long_len: int = 768,
    short_len: int = 32,
    output_len: int = 16,
    rate: float = 6.0,
) -> list[TraceRequest]:
    """``num_long`` long and ``num_short`` short requests in random order, Poisson arrivals
    at ``rate`` per second."""
    rng = random.Random(seed)
    kinds = ["long"] * num_long + ["short"] * num_short
    rng.shuffle(kinds)
    t = 0.0
    out: list[TraceRequest] = []
    for kind in kinds:
        t += rng.expovariate(rate)
        out.append(TraceRequest(t, long_len if kind == "long" else short_len, output_len, kind))
    return out


def bursty_trace(
    seed: int,
    *,
    num_requests: int = 48,
    rate: float = 6.0,
    burstiness: float = 0.3,
    prompt_median: float = 96.0,
    prompt_sigma: float = 1.0,
    output_median: float = 12.0,
    output_sigma: float = 0.6,
    max_prompt: int = 896,
    max_output: int = 48,
    long_threshold: int = 256,
) -> list[TraceRequest]:
    """Gamma(``burstiness``) inter-arrivals with mean ``1/rate`` and lognormal lengths
    (medians and log-standard deviations given, clipped to ``[4, max_*]``); requests with
    at least ``long_threshold`` prompt tokens are of kind "long"."""
    if burstiness <= 0.0:
        raise ValueError(f"burstiness (the Gamma shape) must be positive, got {burstiness}")
    if rate <= 0.0:
        raise ValueError(f"rate must be positive, got {rate}")
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)  # Gamma mean = shape * scale = 1 / rate
    t = 0.0
    out: list[TraceRequest] = []
    for _ in range(num_requests):
        t += rng.gammavariate(burstiness, scale)
        p = _lognormal_len(rng, prompt_median, prompt_sigma, 4, max_prompt)
        o = _lognormal_len(rng, output_median, output_sigma, 2, max_output)
        out.append(TraceRequest(t, p, o, "long" if p >= long_threshold else "short"))
    return out


def diurnal_trace(
    seed: int,
    *,
    num_requests: int = 48,
    rate: float = 5.0,
    amplitude: float = 0.8,
    period: float = 4.0,
    long_share: float = 0.3,
    long_median: float = 640.0,
    short_median: float = 64.0,
    output_median: float = 10.0,
    max_prompt: int = 896,
    max_output: int = 40,
) -> list[TraceRequest]:
    """Poisson arrivals whose rate swings sinusoidally around ``rate`` (``amplitude`` in
    [0, 1], ``period`` seconds, starting at the mean rate and rising); a ``long_share``
    of requests has a long context (lognormal around ``long_median``), the rest short
    prompts; lognormal outputs."""
    if not 0.0 <= amplitude <= 1.0:
        raise ValueError(f"amplitude must be in [0, 1], got {amplitude}")
    if rate <= 0.0 or period <= 0.0:
        raise ValueError(f"rate and period must be positive, got {rate} and {period}")
    rng = random.Random(seed)
    peak = rate * (1.0 + amplitude)
    t = 0.0
    out: list[TraceRequest] = []
    while len(out) < num_requests:
        t += rng.expovariate(peak)
        # thinning (Lewis and Shedler): keep a candidate with probability rate(t) / peak
        if rng.random() * peak > rate * (1.0 + amplitude * math.sin(2 * math.pi * t / period)):
            continue
        if rng.random() < long_share:
            p = _lognormal_len(rng, long_median, 0.25, 256, max_prompt)
            kind = "long"
        else:
            p = _lognormal_len(rng, short_median, 0.6, 4, 255)
            kind = "short"
        o = _lognormal_len(rng, output_median, 0.5, 2, max_output)
        out.append(TraceRequest(t, p, o, kind))
    return out
