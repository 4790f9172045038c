"""Step-cost model learned from the engine's step timings.

A step that computes ``n`` tokens is modelled as taking ``a + b * n`` milliseconds: ``a``
is what every step pays whatever its size (weight streaming, kernel launches, Python), ``b``
the cost of one more token. Decode-only steps (few tokens) and prefill steps (many) both
occur in normal serving, so both terms can be fitted from the timings alone.
"""

from __future__ import annotations

import math

__all__ = ["StepCostModel"]


class StepCostModel:
    """``a + b * tokens`` fitted by exponentially weighted least squares.

    The prior (``a_ms``, ``b_ms``) enters as two pseudo-observations, at one token and at
    ``ref_tokens``, each of weight ``prior_weight``; every real observation first decays
    the weight of what came before by ``1 - ewma``, so the prior and old timings fade and
    the fit follows a machine whose speed changes. While the observations have no spread in
    token count, the prior's slope is what keeps the fit well-posed.
    """

    def __init__(
        self,
        a_ms: float,
        b_ms: float,
        *,
        ewma: float = 0.1,
        ref_tokens: int = 256,
        prior_weight: float = 1.0,
    ) -> None:
        if not 0.0 <= ewma <= 1.0:
            raise ValueError(f"ewma must be in [0, 1], got {ewma}")
        self.ewma = ewma
        # weighted sums: weight, x, y, x*x, x*y (x: tokens, y: milliseconds)
        self._s = [0.0, 0.0, 0.0, 0.0, 0.0]
        for x in (1.0, float(max(2, ref_tokens))):
            self._add(x, a_ms + b_ms * x, prior_weight)
        self.a_ms = a_ms
        self.b_ms = b_ms
        self.num_observations = 0

    def _add(self, x: float, y: float, w: float) -> None:
        s = self._s
        s[0] += w
        s[1] += w * x
        s[2] += w * y
        s[3] += w * x * x
        s[4] += w * x * y

    def observe(self, num_tokens: int, seconds: float) -> None:
        """Add one step's timing; steps that computed nothing are ignored."""
        if num_tokens <= 0 or not seconds >= 0 or math.isinf(seconds):
            return
        keep = 1.0 - self.ewma
        self._s = [v * keep for v in self._s]
        self._add(float(num_tokens), seconds * 1000.0, 1.0)
        self.num_observations += 1
        w, sx, sy, sxx, sxy = self._s
        var = w * sxx - sx * sx
        b = (w * sxy - sx * sy) / var if var > 1e-9 * w * w else self.b_ms
        b = max(b, 0.0)  # a step never gets cheaper with more tokens
        a = (sy - b * sx) / w
        if a < 0.0:  # keep the intercept physical: refit the slope through the origin
            a, b = 0.0, max(sxy / sxx, 0.0)
        self.a_ms, self.b_ms = a, b

    def step_ms(self, num_tokens: int) -> float:
        """Predicted wall time of a step of ``num_tokens`` tokens."""
        return self.a_ms + self.b_ms * num_tokens

    def tokens_within(self, ms: float) -> int:
        """Most tokens a step can compute within ``ms`` (negative: not even an empty step)."""
        room = ms - self.a_ms
        if self.b_ms <= 0.0:
            return 1 << 30 if room >= 0 else -1
        return math.floor(room / self.b_ms)

    def prefill_ms(self, num_tokens: int, chunk: int, other_tokens: int = 0) -> float:
        """Time to compute ``num_tokens`` in chunks of at most ``chunk`` tokens per step,
        each step also carrying ``other_tokens`` (the decodes)."""
        if num_tokens <= 0:
            return 0.0
        chunk = max(1, chunk)
        steps = math.ceil(num_tokens / chunk)
        return steps * (self.a_ms + self.b_ms * other_tokens) + self.b_ms * num_tokens
