"""Routing policies: given a request and the eligible workers, pick one.

Every policy is a plain object with ``choose(request, workers) -> Worker``; the caller
has already kept only the healthy workers that serve the request's model, in a stable
order (the order they were registered). After a choice, ``policy.last_decision`` names
why that worker was picked (a label of the router's metrics).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sagellm.engine.router.prefix_tree import PrefixTree
from sagellm.engine.router.workers import Worker

__all__ = [
    "POLICIES",
    "CacheAwarePolicy",
    "LeastLoadPolicy",
    "Policy",
    "RouteRequest",
    "RoundRobinPolicy",
    "DEVICE_HEADER",
    "SLOPolicy",
    "TTFT_HEADER",
    "make_policy",
    "request_text",
]


#: Request header carrying a request's TTFT objective in milliseconds (the ``slo`` policy).
TTFT_HEADER = "x-sagellm-ttft-ms"
#: Request header naming the device kind a request must run on (``cuda``, ``npu``, ...).
DEVICE_HEADER = "x-sagellm-device"


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at: the model, the prompt as text, its token count if known,
    and its TTFT objective if the client gave one (header :data:`TTFT_HEADER`)."""

    model: str
    text: str = ""
    num_prompt_tokens: int | None = None  # known when the prompt is token ids
    ttft_ms: float | None = None
    device: str | None = None  # only workers of this device kind (header DEVICE_HEADER)

    @classmethod
    def from_body(
        cls, body: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> RouteRequest:
        """From an OpenAI completions or chat body (and the request's headers). Raises
        ValueError for a TTFT header that is not a positive number."""
        prompt = body.get("prompt")
        num_tokens = None
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            num_tokens = len(prompt)
        ttft: float | None = None
        raw = (headers or {}).get(TTFT_HEADER)
        if raw is not None:
            try:
                ttft = float(raw)
            except ValueError:
                ttft = math.nan
            if not (math.isfinite(ttft) and ttft > 0):
                raise ValueError(
                    f"{TTFT_HEADER} must be a positive number of milliseconds, got {raw!r}"
                )
        device = (headers or {}).get(DEVICE_HEADER)
        return cls(
            str(body.get("model", "")),
            request_text(body),
            num_tokens,
            ttft,
            device.strip().lower() if device else None,
        )


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else json.dumps(content, sort_keys=True)


def request_text(body: dict[str, Any]) -> str:
    """The prompt as one string: the completion prompt, or the chat rendered as text.

    Chat messages render as ``<|role|>content`` one after the other, so a conversation's
    next turn extends the previous turn's text. Token-id prompts render as their ids.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if isinstance(m, dict):
                parts.append(f"<|{m.get('role', '')}|>{_content_text(m.get('content'))}")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):  # a batch of prompts: route by the first
            return first
        if isinstance(first, int):
            return " ".join(str(t) for t in prompt)
        if isinstance(first, list):
            return " ".join(str(t) for t in first)
    return ""


class Policy(Protocol):
    """What the router needs of a policy."""

    name: str
    last_decision: str

    def choose(self, request: RouteRequest, workers: Sequence[Worker]) -> Worker:
        """One of ``workers`` (never empty) for ``request``."""
        ...

    def forget(self, worker: Worker) -> None:
        """Drop what the policy keeps about a removed worker."""
        ...


def _least_loaded(workers: Sequence[Worker], tiebreak: Any = None) -> Worker:
    """Lowest load; ties by ``tiebreak(worker)`` (if given), then registration order."""
    if tiebreak is None:
        return min(workers, key=lambda w: w.load)
    return min(workers, key=lambda w: (w.load, tiebreak(w)))


class RoundRobinPolicy:
    """The eligible workers in turn (one counter across all requests)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0
        self.last_decision = "round_robin"

    def choose(self, request: RouteRequest, workers: Sequence[Worker]) -> Worker:
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker

    def forget(self, worker: Worker) -> None:
        pass


class LeastLoadPolicy:
    """The worker with the fewest open requests (ties: the first registered).

    The load is the router's in-flight count, raised to the worker's own
    running + waiting count when the router scrapes the worker's ``/metrics``.
    """

    name = "least_load"

    def __init__(self) -> None:
        self.last_decision = "least_load"

    def choose(self, request: RouteRequest, workers: Sequence[Worker]) -> Worker:
        return _least_loaded(workers)

    def forget(self, worker: Worker) -> None:
        pass


class CacheAwarePolicy:
    """Send a request where its prefix was sent before, unless the load is imbalanced.

    * Imbalanced (``max - min > balance_abs_threshold`` and
      ``max > min * balance_rel_threshold`` over the eligible workers' loads): the least
      loaded worker (decision ``imbalanced``).
    * Otherwise the worker whose prefix tree matches the most characters of the
      request's text, if ``matched / len(text) > cache_threshold`` (``cache_hit``);
      ties go to the less loaded, then the first registered.
    * Otherwise the least loaded worker; ties to the one with the smallest tree, so new
      prefixes spread over idle workers (``cache_miss``).

    The chosen worker's tree then gets the text in every case. Each tree is bounded to
    ``max_tree_chars`` characters (least recently used leaves are evicted).
    """

    name = "cache_aware"

    def __init__(
        self,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        max_tree_chars: int = 1 << 22,
    ) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError("cache_threshold must be in [0, 1]")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.max_tree_chars = max_tree_chars
        self.trees: dict[str, PrefixTree] = {}
        self.last_decision = "cache_miss"

    def tree(self, worker: Worker) -> PrefixTree:
        tree = self.trees.get(worker.name)
        if tree is None:
            tree = self.trees[worker.name] = PrefixTree(self.max_tree_chars)
        return tree

    def imbalanced(self, workers: Sequence[Worker]) -> bool:
        loads = [w.load for w in workers]
        hi, lo = max(loads), min(loads)
        return hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold

    def choose(self, request: RouteRequest, workers: Sequence[Worker]) -> Worker:
        text = request.text
        if len(workers) > 1 and self.imbalanced(workers):
            worker = _least_loaded(workers)
            self.last_decision = "imbalanced"
        else:
            best, best_len = None, -1
            if text:
                for w in workers:
                    n = self.tree(w).peek(text)
                    if n > best_len or (n == best_len and best is not None and w.load < best.load):
                        best, best_len = w, n
            if best is not None and best_len / len(text) > self.cache_threshold:
                worker = best
                self.last_decision = "cache_hit"
            else:
                worker = _least_loaded(workers, lambda w: len(self.tree(w)))
                self.last_decision = "cache_miss"
        if text:
            self.tree(worker).insert(text)
        return worker

    def forget(self, worker: Worker) -> None:
        self.trees.pop(worker.name, None)


class SLOPolicy:
    """Route by predicted time to first token against the request's TTFT objective.

    The router measures, per worker, the time from sending a streamed request to its first
    chunk and the requests it had open then; ``observe`` keeps an exponentially weighted
    mean of the time per open request (``ttft / (open + 1)``), so a worker's predicted TTFT
    for one more request is that mean times (its load + 1). Workers of different speed
    (another engine, another accelerator) so get different predictions at the same load.

    A request with an objective (``RouteRequest.ttft_ms``, else ``default_ttft_ms``) goes
    to the worker that meets it with the least slack (best fit), keeping faster workers
    free for tighter objectives; when none is predicted to meet it, or without an
    objective, to the lowest prediction. A worker without a measurement yet is tried first
    (its prediction is unknown, not zero). Decisions: ``slo_explore``, ``slo_fit``,
    ``slo_fastest`` (none fits), ``slo_none`` (no objective: the lowest prediction).
    """

    name = "slo"

    def __init__(self, default_ttft_ms: float | None = None, alpha: float = 0.2) -> None:
        if default_ttft_ms is not None and not default_ttft_ms > 0:
            raise ValueError(f"default_ttft_ms must be positive, got {default_ttft_ms}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.default_ttft_ms = default_ttft_ms
        self.alpha = alpha
        self._per_request: dict[str, float] = {}  # worker -> seconds per open request
        self.last_decision = "slo_none"

    def observe(self, worker: Worker, ttft_s: float, open_before: int) -> None:
        """One streamed request's time to first chunk on ``worker``, sent while it had
        ``open_before`` other requests open."""
        sample = ttft_s / (open_before + 1)
        old = self._per_request.get(worker.name)
        self._per_request[worker.name] = (
            sample if old is None else old + self.alpha * (sample - old)
        )

    def predicted_ms(self, worker: Worker) -> float | None:
        """Predicted TTFT of one more request on ``worker`` (None: not measured yet)."""
        per = self._per_request.get(worker.name)
        return None if per is None else 1000.0 * per * (worker.load + 1)

    def choose(self, request: RouteRequest, workers: Sequence[Worker]) -> Worker:
        unknown = [w for w in workers if w.name not in self._per_request]
        if unknown:
            self.last_decision = "slo_explore"
            return _least_loaded(unknown)
        predicted = [(self.predicted_ms(w) or 0.0, i, w) for i, w in enumerate(workers)]
        objective = request.ttft_ms if request.ttft_ms is not None else self.default_ttft_ms
        if objective is not None:
            fits = [p for p in predicted if p[0] <= objective]
            if fits:
                self.last_decision = "slo_fit"
                return max(fits, key=lambda p: (p[0], -p[1]))[2]
            self.last_decision = "slo_fastest"
        else:
            self.last_decision = "slo_none"
        return min(predicted, key=lambda p: (p[0], p[1]))[2]

    def forget(self, worker: Worker) -> None:
        self._per_request.pop(worker.name, None)


POLICIES = ("round_robin", "least_load", "cache_aware", "slo")


def make_policy(name: str, **options: Any) -> Policy:
    """A policy by name; ``options`` go to the cache-aware and slo policies."""
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "least_load":
        return LeastLoadPolicy()
    if name == "cache_aware":
        return CacheAwarePolicy(**options)
    if name == "slo":
        return SLOPolicy(**options)
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
