"""Per-tenant admission: concurrent requests and tokens per minute.

A request is charged its prompt tokens plus the tokens it may generate (``max_tokens``
times ``n``) when it is admitted, in a sliding 60-second window; when it ends, the charge
drops to what it really used, so a request that stopped early leaves room for others.
A refusal says how many seconds to wait (the ``Retry-After`` of the 429): for tokens, until
enough of the window's charges expire; for concurrency, one second (requests end at no
predictable time). Everything runs on the event loop, so no lock is needed.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sagellm.engine.server.tenants import Tenant

__all__ = ["Admission", "RateLimiter", "Refusal"]

#: Length of the tokens-per-minute window, seconds.
WINDOW_S = 60.0


@dataclass(slots=True)
class _Charge:
    time: float  # when it was admitted
    num_tokens: int  # tokens it counts for in the window
    in_window: bool = True  # False once it expired (its tokens no longer count)


@dataclass(slots=True)
class _TenantState:
    num_running: int = 0  # admitted requests not yet released
    charges: deque[_Charge] = field(default_factory=deque)  # oldest first
    num_window_tokens: int = 0  # sum of the charges' tokens


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not admitted."""

    kind: str  # "requests" (concurrency) or "tokens" (tokens per minute): OpenAI's types
    message: str  # for the client; names the limit, never another tenant
    retry_after_s: int  # whole seconds, at least 1


class Admission:
    """An admitted request's slot; :meth:`release` it exactly when the request ends."""

    def __init__(self, limiter: RateLimiter, tenant: str, charge: _Charge | None) -> None:
        self._limiter = limiter
        self._tenant = tenant
        self._charge = charge
        self._released = False

    @property
    def released(self) -> bool:
        """True once the slot was given back."""
        return self._released

    def release(self, num_used_tokens: int | None = None) -> None:
        """Give the slot back; ``num_used_tokens`` (when known) lowers the charge to it.

        Safe to call more than once: only the first call counts.
        """
        if self._released:
            return
        self._released = True
        self._limiter._release(self._tenant, self._charge, num_used_tokens)


class RateLimiter:
    """Admits requests within each tenant's limits.

    Usage::

        limiter = RateLimiter()
        slot = limiter.acquire(tenant, num_tokens=prompt_len + max_tokens)
        if isinstance(slot, Refusal): ...  # 429, Retry-After: slot.retry_after_s
        try: ...
        finally: slot.release(num_used_tokens)
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, _TenantState] = {}

    def num_running(self, tenant: str) -> int:
        """Admitted, unreleased requests of ``tenant``."""
        state = self._states.get(tenant)
        return state.num_running if state is not None else 0

    def num_window_tokens(self, tenant: str) -> int:
        """Tokens ``tenant`` is charged for in the current window."""
        state = self._states.get(tenant)
        if state is None:
            return 0
        self._expire(state, self._clock())
        return state.num_window_tokens

    def acquire(self, tenant: Tenant, num_tokens: int) -> Admission | Refusal:
        """Admit one request of ``tenant`` charged ``num_tokens``, or say why not."""
        limit_requests = tenant.max_concurrent_requests
        limit_tokens = tenant.max_tokens_per_minute
        state = self._states.setdefault(tenant.name, _TenantState())
        if limit_requests is not None and state.num_running >= limit_requests:
            return Refusal(
                "requests",
                f"Rate limit reached: at most {limit_requests} concurrent requests per "
                f"tenant, and {state.num_running} are running. Retry when one has finished.",
                1,
            )
        charge = None
        if limit_tokens is not None:
            now = self._clock()
            self._expire(state, now)
            if num_tokens > limit_tokens:
                return Refusal(
                    "tokens",
                    f"Request too large: it needs {num_tokens} tokens (prompt plus max_tokens) "
                    f"but the limit is {limit_tokens} tokens per minute. Reduce the prompt "
                    "or max_tokens.",
                    math.ceil(WINDOW_S),
                )
            if state.num_window_tokens + num_tokens > limit_tokens:
                wait = self._wait_for(state, num_tokens - (limit_tokens - state.num_window_tokens))
                retry = max(1, math.ceil(wait - now))
                return Refusal(
                    "tokens",
                    f"Rate limit reached on tokens per minute: limit {limit_tokens}, used "
                    f"{state.num_window_tokens}, requested {num_tokens}. Please try again in "
                    f"{retry}s.",
                    retry,
                )
            charge = _Charge(now, num_tokens)
            state.charges.append(charge)
            state.num_window_tokens += num_tokens
        state.num_running += 1
        return Admission(self, tenant.name, charge)

    # ------------------------------------------------------------------ internals

    def _release(self, tenant: str, charge: _Charge | None, num_used: int | None) -> None:
        state = self._states[tenant]
        assert state.num_running > 0, "a slot released twice"
        state.num_running -= 1
        if charge is not None and num_used is not None and num_used < charge.num_tokens:
            if charge.in_window:
                state.num_window_tokens -= charge.num_tokens - max(num_used, 0)
            charge.num_tokens = max(num_used, 0)
        if state.num_running == 0 and not state.charges:
            del self._states[tenant]

    def _expire(self, state: _TenantState, now: float) -> None:
        while state.charges and state.charges[0].time + WINDOW_S <= now:
            charge = state.charges.popleft()
            charge.in_window = False
            state.num_window_tokens -= charge.num_tokens

    @staticmethod
    def _wait_for(state: _TenantState, num_tokens: int) -> float:
        """When the oldest charges that free ``num_tokens`` leave the window."""
        freed = 0
        for c in state.charges:
            freed += c.num_tokens
            if freed >= num_tokens:
                return c.time + WINDOW_S
        raise AssertionError("the window holds fewer tokens than it counts")
