"""Workers as the router sees them: what they serve, their health and their load."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HealthPolicy", "Worker", "parse_worker_spec", "split_device"]


@dataclass(frozen=True)
class HealthPolicy:
    """Consecutive failures that take a worker out, successes that bring it back."""

    failures: int = 3
    successes: int = 2

    def __post_init__(self) -> None:
        if self.failures < 1 or self.successes < 1:
            raise ValueError("health failures and successes must be >= 1")


@dataclass(eq=False)
class Worker:
    """One backend: an HTTP server (``url``) or an in-process engine (``engine``).

    ``models`` maps each served model name to its longest context (None: unknown).
    ``declared`` marks models given by the operator, which discovery does not replace.
    """

    name: str
    url: str | None = None
    engine: Any = None
    models: dict[str, int | None] = field(default_factory=dict)
    declared: bool = False
    health: HealthPolicy = field(default_factory=HealthPolicy)
    healthy: bool = True
    in_flight: int = 0  # requests this router has open on the worker
    reported_load: int | None = None  # running + waiting from the worker's /metrics
    reported_at: float = 0.0
    model_cards: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the device kind it computes on ("cuda", "npu", "cpu", ...): declared as URL#kind,
    # else read from its /v1/models card (sageLLM reports it; None: unknown)
    device: str | None = None
    device_declared: bool = False
    # a prefill instance's decode partner (prefill/decode disaggregation): requests routed
    # here are prefilled here, then decoded there with the prompt's KV (None: standalone)
    decode: Worker | None = None
    _failures: int = field(default=0, init=False, repr=False)
    _successes: int = field(default=0, init=False, repr=False)

    @property
    def load(self) -> int:
        """The router's in-flight count, or the worker's own report when that is higher.

        The worker's count includes requests from other clients; the router's count is
        exact for its own requests and moves between two scrapes.
        """
        if self.reported_load is None:
            return self.in_flight
        return max(self.in_flight, self.reported_load)

    def serves(self, model: str) -> bool:
        return model in self.models

    def record_failure(self) -> bool:
        """A failed request or health check; True when this takes the worker out."""
        self._successes = 0
        self._failures += 1
        if self.healthy and self._failures >= self.health.failures:
            self.healthy = False
            return True
        return False

    def record_success(self) -> bool:
        """A successful request or health check; True when this brings the worker back."""
        self._failures = 0
        if self.healthy:
            return False
        self._successes += 1
        if self._successes >= self.health.successes:
            self.healthy = True
            self._successes = 0
            return True
        return False

    def mark_down(self) -> None:
        """Out until ``health.successes`` checks succeed (a worker unreachable at start)."""
        self.healthy = False
        self._successes = 0
        self._failures = self.health.failures

    def set_reported_load(self, value: int | None) -> None:
        self.reported_load = value
        self.reported_at = time.monotonic()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "healthy": self.healthy,
            "models": dict(self.models),
            "in_flight": self.in_flight,
            "reported_load": self.reported_load,
            **({"decode": self.decode.describe()} if self.decode is not None else {}),
        }


def split_device(spec: str) -> tuple[str, str | None]:
    """``SPEC#kind`` -> (SPEC, kind); a spec without ``#`` -> (spec, None). A base URL has
    no fragment, so ``#`` is free to carry the worker's device kind."""
    head, sep, kind = spec.partition("#")
    if not sep:
        return spec, None
    if not kind or "/" in kind or "@" in kind:
        raise ValueError(f"worker {spec!r}: write the device kind last, as URL[@models]#kind")
    return head, kind.lower()


def parse_worker_spec(spec: str) -> tuple[str, list[str]]:
    """``URL`` or ``URL@model[,model...]`` -> (url without trailing slash, models)."""
    url, models = spec, []
    scheme_end = spec.find("://")
    at = spec.rfind("@")
    if at > scheme_end + 2:  # an '@' after the host (not user@host in the authority)
        tail = spec[at + 1 :]
        if "/" not in tail:
            url, models = spec[:at], [m for m in tail.split(",") if m]
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/"), models
