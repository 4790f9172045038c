"""Seeded traces: LLM KV-block accesses of a chat service, and synthetic Zipf keys.

:func:`kv_trace` simulates the requests of a serving engine with a prefix cache and
records, for every request, the KV blocks it reads or writes, in order:

- ``chat``: a session of several turns; turn *n* re-reads every block of its context
  (system prompt, earlier user messages and answers) and appends the blocks of the new
  user message and of the answer. The next turn comes after the answer is decoded and
  the user has thought (exponential think time).
- ``few_shot``: a system prompt, a shared template (Zipf-popular), a new question and
  its answer.
- ``completion``: a system prompt, a new prompt and its answer.
- ``one_off``: a prompt and answer with nothing shared (never seen again).

System prompts are few and Zipf-popular. Block keys are hash-chained over block
contents like vLLM's prefix-caching block hashes: a block's key is a 64-bit blake2b of
its parent's key and its content id, so equal prefixes share keys and a key depends on
every block before it. Only full blocks are cached, so a partial last block is not
recorded. Every access carries its request's arrival time and features named as for
:class:`~sagellm.core.protocols.LifetimePredictor`: ``prefix_depth`` (tokens up to the
end of the block), ``request_kind`` (index of :class:`~sagellm.core.types.RequestKind`)
and ``tenant_hash``.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import accumulate

from sagellm.core.types import RequestKind
from sagellm.eviction.config import KVTraceConfig, ZipfTraceConfig

__all__ = ["KIND_INDEX", "KVTrace", "kv_trace", "zipf_keys", "zipf_trace"]

#: RequestKind -> value of the ``request_kind`` feature
KIND_INDEX = {kind: float(i) for i, kind in enumerate(RequestKind)}


@dataclass
class KVTrace:
    """Parallel per-access lists (one entry per block access, in time order)."""

    keys: list[int] = field(default_factory=list)  # block hash
    times: list[float] = field(default_factory=list)  # arrival time of the request (s)
    prefix_depths: list[int] = field(default_factory=list)  # tokens up to the block's end
    kinds: list[int] = field(default_factory=list)  # index of the request's RequestKind
    tenants: list[int] = field(default_factory=list)  # tenant hash
    request_starts: list[int] = field(default_factory=list)  # first access of each request

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_requests(self) -> int:
        return len(self.request_starts)

    @property
    def num_distinct(self) -> int:
        return len(set(self.keys))

    def features(self) -> list[dict[str, float]]:
        """One feature mapping per access (``prefix_depth``, ``request_kind``, ``tenant_hash``)."""
        return [
            {"prefix_depth": float(d), "request_kind": float(k), "tenant_hash": float(t)}
            for d, k, t in zip(self.prefix_depths, self.kinds, self.tenants)
        ]

    def requests(self) -> list[list[int]]:
        """Block keys of every request, in arrival order."""
        bounds = [*self.request_starts, len(self.keys)]
        return [self.keys[a:b] for a, b in zip(bounds, bounds[1:])]


def _block_key(parent: int, content: int) -> int:
    digest = hashlib.blake2b(
        parent.to_bytes(8, "little") + content.to_bytes(8, "little"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


def _zipf_cum_weights(n: int, alpha: float) -> list[float]:
    return list(accumulate(1.0 / (k**alpha) for k in range(1, n + 1)))


def _tenant_hash(tenant: int) -> int:
    digest = hashlib.blake2b(f"tenant-{tenant}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass
class _Session:
    """A request stream sharing one block chain (a chat, or a single request)."""

    kind: RequestKind
    tenant: int
    chain: list[int]  # block keys of the context so far
    tokens: int  # tokens of the context so far (the last block may be partial)
    turns_left: int


class _Generator:
    def __init__(self, config: KVTraceConfig) -> None:
        self.c = config
        self.rng = random.Random(config.seed)
        self.content_ids = itertools.count(1)
        rng = self.rng
        lo, hi = config.system_prompt_tokens
        # each system prompt / template: (chain of block keys, token count)
        self.systems = [
            self._chain(0, rng.randint(lo, hi)) for _ in range(config.num_system_prompts)
        ]
        lo, hi = config.template_tokens
        self.templates = []
        for _ in range(config.num_templates):
            system = self.systems[self._zipf_pick(self._system_cw)]
            self.templates.append(self._extend(system, rng.randint(lo, hi)))
        self.tenant_hashes = [_tenant_hash(t) for t in range(config.num_tenants)]
        shares = [
            config.chat_share,
            config.few_shot_share,
            config.completion_share,
            config.one_off_share,
        ]
        self.kind_cw = list(accumulate(shares))
        self.kinds = [
            RequestKind.CHAT,
            RequestKind.FEW_SHOT,
            RequestKind.COMPLETION,
            RequestKind.ONE_OFF,
        ]

    @property
    def _system_cw(self) -> list[float]:
        if not hasattr(self, "_scw"):
            self._scw = _zipf_cum_weights(self.c.num_system_prompts, self.c.system_prompt_alpha)
        return self._scw

    @property
    def _template_cw(self) -> list[float]:
        if not hasattr(self, "_tcw"):
            self._tcw = _zipf_cum_weights(self.c.num_templates, self.c.template_alpha)
        return self._tcw

    def _zipf_pick(self, cum_weights: list[float]) -> int:
        return bisect_left(cum_weights, self.rng.random() * cum_weights[-1])

    def _lognormal_tokens(self, median: int) -> int:
        return max(1, int(round(median * math.exp(self.rng.gauss(0.0, 0.8)))))

    def _chain(self, parent: int, tokens: int) -> tuple[list[int], int]:
        return self._extend(([], 0), tokens, parent)

    def _extend(
        self, base: tuple[list[int], int], tokens: int, root: int = 0
    ) -> tuple[list[int], int]:
        """Append ``tokens`` new tokens to a context; new full blocks get new content."""
        chain, have = list(base[0]), base[1]
        bs = self.c.block_size
        # a partial last block is re-written as it fills: it gets its content id when full
        total = have + tokens
        parent = chain[-1] if chain else root
        for _ in range(len(chain), total // bs):
            parent = _block_key(parent, next(self.content_ids))
            chain.append(parent)
        return chain, total

    def run(self) -> KVTrace:
        c, rng = self.c, self.rng
        trace = KVTrace()
        # events: (time, order, session or None for a new arrival)
        events: list[tuple[float, int, _Session | None]] = []
        order = itertools.count()
        heapq.heappush(events, (rng.expovariate(c.arrival_rate), next(order), None))
        while events:
            now, _, session = heapq.heappop(events)
            if now > c.duration_seconds:
                break
            if session is None:
                heapq.heappush(events, (now + rng.expovariate(c.arrival_rate), next(order), None))
                session = self._new_session()
            new_chain, new_tokens, answer_tokens = self._next_request(session)
            tenant = self.tenant_hashes[session.tenant]
            kind = int(KIND_INDEX[session.kind])
            trace.request_starts.append(len(trace.keys))
            bs = c.block_size
            for i, key in enumerate(new_chain[0]):
                trace.keys.append(key)
                trace.times.append(now)
                trace.prefix_depths.append((i + 1) * bs)
                trace.kinds.append(kind)
                trace.tenants.append(tenant)
            session.chain, session.tokens = new_chain
            session.turns_left -= 1
            if session.turns_left > 0:
                decode = answer_tokens / c.decode_tokens_per_second
                think = rng.expovariate(1.0 / c.mean_think_seconds)
                heapq.heappush(events, (now + decode + think, next(order), session))
        return trace

    def _new_session(self) -> _Session:
        c, rng = self.c, self.rng
        kind = self.kinds[bisect_left(self.kind_cw, rng.random() * self.kind_cw[-1])]
        tenant = rng.randrange(c.num_tenants)
        turns = 1
        if kind is RequestKind.CHAT:
            # geometric number of turns with the configured mean, capped
            p_end = 1.0 / c.mean_turns
            while turns < c.max_turns and rng.random() > p_end:
                turns += 1
        chain: list[int]
        if kind is RequestKind.ONE_OFF:
            chain, tokens = [], 0
        elif kind is RequestKind.FEW_SHOT:
            chain, tokens = self.templates[self._zipf_pick(self._template_cw)]
        else:
            chain, tokens = self.systems[self._zipf_pick(self._system_cw)]
        return _Session(kind, tenant, list(chain), tokens, turns)

    def _next_request(self, s: _Session) -> tuple[tuple[list[int], int], int, int]:
        """Blocks of the session's next request: context + prompt + answer."""
        c = self.c
        if s.kind is RequestKind.CHAT:
            prompt = self._lognormal_tokens(c.median_user_tokens)
        elif s.kind is RequestKind.FEW_SHOT:
            prompt = self._lognormal_tokens(c.median_question_tokens)
        else:
            prompt = self._lognormal_tokens(c.median_user_tokens)
        answer = self._lognormal_tokens(c.median_answer_tokens)
        root = 0 if s.chain else next(self.content_ids)  # a one-off starts its own chain
        full = self._extend((s.chain, s.tokens), prompt + answer, root)
        return full, prompt, answer


def kv_trace(config: KVTraceConfig | None = None) -> KVTrace:
    """The KV-block access trace of ``config`` (the defaults when None); deterministic."""
    return _Generator(config or KVTraceConfig()).run()


def zipf_keys(config: ZipfTraceConfig | None = None) -> list[int]:
    """``num_requests`` keys drawn from ``range(num_objects)`` with P(k) ~ (k + 1)^-alpha."""
    c = config or ZipfTraceConfig()
    rng = random.Random(c.seed)
    cw = _zipf_cum_weights(c.num_objects, c.alpha)
    total = cw[-1]
    draw = rng.random
    n = c.num_objects - 1
    return [min(bisect_left(cw, draw() * total), n) for _ in range(c.num_requests)]


def zipf_trace(
    alpha: float, *, num_objects: int = 10_000, num_requests: int = 100_000, seed: int = 0
) -> list[int]:
    """Shorthand for :func:`zipf_keys` with a :class:`ZipfTraceConfig` of these values."""
    return zipf_keys(
        ZipfTraceConfig(alpha=alpha, num_objects=num_objects, num_requests=num_requests, seed=seed)
    )
