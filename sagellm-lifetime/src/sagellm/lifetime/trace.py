"""Seeded KV access traces shaped like LLM serving, with true next-access labels.

Requests arrive as a Poisson process and are of four kinds:

* chat: a conversation of several turns (geometric count); each turn reads the shared
  system prompt and the conversation's own history prefix, which returns after the
  user's think time (log-normal, slower for some tenants) unless the conversation ends;
* completion: a system prompt plus a prompt that is regenerated shortly after, sometimes;
* few-shot: a shared template (Zipf popularity) plus a question read once;
* one-off: a prompt never seen again.

Every access of a cached entry (a prefix) becomes a :class:`KVAccess` with the features
an engine knows at that moment, and is labelled afterwards with the TTL bucket of the gap
to the same entry's next access ("later or never" when there is none within the last
edge; ``None`` when the trace ends too soon to tell).
"""

from __future__ import annotations

import heapq
import math
import random
import zlib
from dataclasses import dataclass
from typing import Any

from sagellm.core.types import RequestKind
from sagellm.lifetime.buckets import TtlBuckets, kind_index

__all__ = ["KVAccess", "TraceConfig", "generate_trace", "label_trace"]


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """Shape of a generated trace."""

    duration_s: float = 1800.0  # simulated seconds
    request_rate: float = 6.0  # requests per second (Poisson)
    num_tenants: int = 4
    num_system_prompts: int = 12
    num_templates: int = 40
    chat_share: float = 0.4
    completion_share: float = 0.25
    few_shot_share: float = 0.2  # the rest is one-off
    mean_turns: float = 4.0  # turns per conversation (geometric)
    regenerate_probability: float = 0.25  # a completion is asked again within seconds
    zipf_s: float = 1.1  # popularity skew of system prompts and templates
    seed: int = 0


@dataclass(frozen=True, slots=True)
class KVAccess:
    """One read of a cached prefix."""

    time: float  # seconds since the trace start
    key: str  # the prefix entry ("sys:3", "conv:17", ...)
    kind: RequestKind  # kind of the request that read it
    tenant: str
    features: dict[str, float]  # what the engine knows now (see sagellm.lifetime.FEATURES)


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def generate_trace(config: TraceConfig = TraceConfig()) -> list[KVAccess]:
    """Accesses in time order (deterministic for a given config)."""
    rng = random.Random(config.seed)
    tenants = [f"tenant-{i}" for i in range(config.num_tenants)]
    tenant_hash = {t: float(zlib.crc32(t.encode()) & 0xFFFF) for t in tenants}
    # think time median per tenant: 6 s, 15 s, 35 s, 80 s, ...
    think_median = {t: 6.0 * 2.4**i for i, t in enumerate(tenants)}
    sys_depth = [rng.randrange(200, 1200) for _ in range(config.num_system_prompts)]
    tpl_depth = [rng.randrange(400, 2000) for _ in range(config.num_templates)]
    sys_w = _zipf_weights(config.num_system_prompts, config.zipf_s)
    tpl_w = _zipf_weights(config.num_templates, config.zipf_s)
    # events: (time, seq, what, payload); a chat turn's payload is
    # (conversation id, tenant, system prompt id, depth), a regeneration's (key, tenant, depth)
    events: list[tuple[float, int, str, tuple[Any, ...]]] = []
    seq = 0
    t = 0.0
    while True:
        t += rng.expovariate(config.request_rate)
        if t >= config.duration_s:
            break
        heapq.heappush(events, (t, seq, "arrival", ()))
        seq += 1

    out: list[KVAccess] = []
    count: dict[str, int] = {}
    last_seen: dict[str, float] = {}

    def access(now: float, key: str, kind: RequestKind, tenant: str, depth: int) -> None:
        n = count.get(key, 0) + 1
        count[key] = n
        prev = last_seen.get(key)
        last_seen[key] = now
        features = {
            "prefix_depth": float(depth),
            "access_count": float(n),
            "seconds_since_last_access": -1.0 if prev is None else now - prev,
            "request_kind": float(kind_index(kind)),
            "tenant_hash": tenant_hash[tenant],
        }
        out.append(KVAccess(now, key, kind, tenant, features))

    next_id = 0
    continue_p = 1.0 - 1.0 / config.mean_turns
    while events:
        now, _, what, payload = heapq.heappop(events)
        if what == "turn":
            conv, tenant, sys_id, depth = payload
            access(now, f"sys:{sys_id}", RequestKind.CHAT, tenant, sys_depth[sys_id])
            access(now, f"conv:{conv}", RequestKind.CHAT, tenant, depth)
            if rng.random() < continue_p:
                think = think_median[tenant] * math.exp(rng.gauss(0.0, 0.5))
                step = rng.randrange(100, 600)
                if now + think < config.duration_s:  # later turns fall outside the trace
                    nxt = (conv, tenant, sys_id, depth + step)
                    heapq.heappush(events, (now + think, seq, "turn", nxt))
                    seq += 1
            continue
        if what == "regenerate":
            key, tenant, depth = payload
            access(now, key, RequestKind.COMPLETION, tenant, depth)
            continue
        tenant = rng.choice(tenants)
        r = rng.random()
        next_id += 1
        if r < config.chat_share:
            sys_id = rng.choices(range(config.num_system_prompts), sys_w)[0]
            depth = sys_depth[sys_id] + rng.randrange(50, 400)
            heapq.heappush(events, (now, seq, "turn", (next_id, tenant, sys_id, depth)))
            seq += 1
        elif r < config.chat_share + config.completion_share:
            sys_id = rng.choices(range(config.num_system_prompts), sys_w)[0]
            access(now, f"sys:{sys_id}", RequestKind.COMPLETION, tenant, sys_depth[sys_id])
            key = f"cmp:{next_id}"
            depth = sys_depth[sys_id] + rng.randrange(20, 1500)
            access(now, key, RequestKind.COMPLETION, tenant, depth)
            if rng.random() < config.regenerate_probability:
                later = now + rng.uniform(1.5, 8.0)
                if later < config.duration_s:
                    heapq.heappush(events, (later, seq, "regenerate", (key, tenant, depth)))
                    seq += 1
        elif r < config.chat_share + config.completion_share + config.few_shot_share:
            tpl = rng.choices(range(config.num_templates), tpl_w)[0]
            access(now, f"tpl:{tpl}", RequestKind.FEW_SHOT, tenant, tpl_depth[tpl])
            depth = tpl_depth[tpl] + rng.randrange(20, 200)
            access(now, f"fsq:{next_id}", RequestKind.FEW_SHOT, tenant, depth)
        else:
            access(now, f"one:{next_id}", RequestKind.ONE_OFF, tenant, rng.randrange(30, 3000))
    return out


def label_trace(trace: list[KVAccess], buckets: TtlBuckets, end: float) -> list[int | None]:
    """TTL bucket of each access's gap to the same key's next access.

    No next access: the last bucket ("later or never") when the trace goes on for at
    least the last edge after it, else ``None`` (unknown, not scored).
    """
    labels: list[int | None] = [None] * len(trace)
    next_time: dict[str, float] = {}
    horizon = buckets.edges[-1]
    for i in range(len(trace) - 1, -1, -1):
        a = trace[i]
        nt = next_time.get(a.key)
        if nt is not None:
            labels[i] = buckets.bucket(nt - a.time)
        elif a.time + horizon <= end:
            labels[i] = buckets.num_buckets - 1
        next_time[a.key] = a.time
    return labels
