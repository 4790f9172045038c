"""Confidence intervals and paired tests for repeated benchmark figures (standard library).

- :func:`median_ci`: the distribution-free confidence interval of a median from order
  statistics (the binomial argument: the k-th smallest and k-th largest of n samples
  bracket the median with probability ``1 - 2 P(Binom(n, 1/2) < k)``).
- :func:`wilcoxon_signed_rank`: the exact two-sided Wilcoxon signed-rank test of paired
  samples (zero differences dropped, tied magnitudes get their average rank).
- :func:`sign_test`: the exact two-sided sign test of paired samples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MedianCI", "median_ci", "sign_test", "wilcoxon_signed_rank"]


@dataclass(frozen=True, slots=True)
class MedianCI:
    """A median with its order-statistic confidence interval."""

    median: float
    low: float
    high: float
    coverage: float  # the interval's exact coverage (at least the asked level when n allows)


def _binom_cdf_half(k: int, n: int) -> float:
    """P(Binom(n, 1/2) <= k)."""
    if k < 0:
        return 0.0
    return sum(math.comb(n, i) for i in range(min(k, n) + 1)) / 2**n


def median_ci(values: Sequence[float], confidence: float = 0.95) -> MedianCI:
    """The median of ``values`` and the narrowest symmetric order-statistic interval whose
    coverage is at least ``confidence``; with too few values for that level, the full
    range ``[min, max]`` and its (lower) coverage ``1 - 2^(1-n)``.

    Raises ValueError for no values or a confidence outside (0, 1).
    """
    if not values:
        raise ValueError("a confidence interval needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    s = sorted(values)
    n = len(s)
    k = 1  # 1-based rank of the lower bound
    while k + 1 <= n // 2 and 1.0 - 2.0 * _binom_cdf_half(k, n) >= confidence:
        k += 1
    coverage = 1.0 - 2.0 * _binom_cdf_half(k - 1, n)
    return MedianCI(statistics.median(s), s[k - 1], s[n - k], coverage)


def sign_test(x: Sequence[float], y: Sequence[float]) -> float:
    """Exact two-sided p of the sign test of pairs ``(x[i], y[i])`` (ties dropped; 1.0
    when every pair ties)."""
    if len(x) != len(y):
        raise ValueError(f"paired samples differ in length: {len(x)} vs {len(y)}")
    pos = sum(a > b for a, b in zip(x, y))
    neg = sum(a < b for a, b in zip(x, y))
    n = pos + neg
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * _binom_cdf_half(min(pos, neg), n))


def wilcoxon_signed_rank(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """``(W+, p)``: the sum of the ranks of the positive differences ``x[i] - y[i]`` and
    the exact two-sided p (the null distribution enumerated over every sign pattern of the
    observed ranks, so ties are handled exactly). Zero differences are dropped; with none
    left, ``(0.0, 1.0)``."""
    if len(x) != len(y):
        raise ValueError(f"paired samples differ in length: {len(x)} vs {len(y)}")
    d = [a - b for a, b in zip(x, y) if a != b]
    n = len(d)
    if n == 0:
        return 0.0, 1.0
    order = sorted(range(n), key=lambda i: abs(d[i]))
    ranks2 = [0] * n  # twice the (average) rank: integers even with ties
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for t in range(i, j + 1):
            ranks2[order[t]] = i + j + 2  # 2 * mean of ranks i+1 .. j+1
        i = j + 1
    w2 = sum(r for r, v in zip(ranks2, d) if v > 0)
    # counts[s]: sign patterns whose positive ranks sum (doubled) to s
    total2 = sum(ranks2)
    counts = [0] * (total2 + 1)
    counts[0] = 1
    for r in ranks2:
        for s in range(total2, r - 1, -1):
            counts[s] += counts[s - r]
    mean2 = total2 / 2.0
    dev = abs(w2 - mean2)
    extreme = sum(c for s, c in enumerate(counts) if abs(s - mean2) >= dev - 1e-9)
    return w2 / 2.0, min(1.0, extreme / 2**n)
