"""Small reference implementations of the protocols, used to exercise the conformance kit.

They live only in these tests: each is the simplest thing that honours its protocol,
so a suite that fails against one of them has a wrong test.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from sagellm.core.errors import InvalidRequestError
from sagellm.core.telemetry import (
    EvictionStats,
    KVPoolStats,
    LifetimeStats,
    PrefixCacheStats,
    SchedulerStats,
)
from sagellm.core.types import (
    EvictionDecision,
    ExecutionPlan,
    FinishReason,
    GenerationRequest,
    IRGraph,
    IRNode,
    IRNodeKind,
    KVBlockInfo,
    KVCacheSchema,
    LifetimePrediction,
    PolicyContext,
    PrefixEntry,
    PrefixMatch,
    ScheduledChunk,
    SchedulerOutput,
    SequenceChunk,
)

_FROZEN = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- KV pool


class ListPoolConfig(BaseModel):
    model_config = _FROZEN
    num_blocks: int = Field(8, ge=1)


class ListKVPool:
    """Reference counts in a list, free ids in a list; storage only when torch is there."""

    config_class: ClassVar[type[BaseModel]] = ListPoolConfig

    def __init__(self, config: ListPoolConfig, *, schema: KVCacheSchema, device: str = "cpu"):
        self._schema = schema
        self._n = config.num_blocks
        self._ref = [0] * self._n
        self._free = list(range(self._n))
        self._counters = [0, 0, 0]  # allocations, failed allocations, frees
        self._layers: list[tuple[Any, Any]] = []
        try:
            import torch
        except ImportError:
            return
        shape = (self._n, schema.block_size, schema.num_kv_heads, schema.head_size)
        dtype = getattr(torch, schema.dtype)
        self._layers = [
            (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
            for _ in range(schema.num_layers)
        ]

    @property
    def schema(self) -> KVCacheSchema:
        return self._schema

    @property
    def num_blocks(self) -> int:
        return self._n

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > len(self._free):
            self._counters[1] += 1
            return None
        ids = self._free[:num_blocks]
        del self._free[:num_blocks]
        for b in ids:
            self._ref[b] = 1
        self._counters[0] += 1
        return ids

    def _check(self, block_ids: Sequence[int], need: Mapping[int, int], what: str) -> None:
        for b in block_ids:
            if not 0 <= b < self._n:
                raise ValueError(f"{what}: unknown block {b}")
        for b, k in need.items():
            if self._ref[b] < k:
                raise ValueError(f"{what}: block {b} has {self._ref[b]} reference(s)")

    def share(self, block_ids: Sequence[int]) -> None:
        self._check(block_ids, {b: 1 for b in block_ids}, "share")
        for b in block_ids:
            self._ref[b] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        need: dict[int, int] = {}
        for b in block_ids:
            need[b] = need.get(b, 0) + 1
        self._check(block_ids, need, "free")
        for b in block_ids:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
                self._counters[2] += 1

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        for k, v in self._layers:
            for src, dst in pairs:
                k[dst] = k[src]
                v[dst] = v[src]

    def layer_cache(self, layer: int) -> tuple[Any, Any]:
        if not self._layers:
            raise RuntimeError("ListKVPool has no storage without torch")
        return self._layers[layer]

    def block_info(self, block_id: int) -> KVBlockInfo:
        return KVBlockInfo(block_id, "device", self._schema.bytes_per_block, self._ref[block_id])

    def make_stats(self) -> KVPoolStats:
        used = self._n - len(self._free)
        stats = KVPoolStats(
            num_blocks=self._n,
            num_used_blocks=used,
            num_free_blocks=len(self._free),
            utilization=used / self._n,
            num_allocations=self._counters[0],
            num_failed_allocations=self._counters[1],
            num_frees=self._counters[2],
        )
        self._counters = [0, 0, 0]
        return stats


# --------------------------------------------------------------------------- prefix index


class EmptyConfig(BaseModel):
    model_config = _FROZEN


class DictPrefixIndex:
    """``(isolation key, prefix tokens) -> block id``; LRU among unlocked leaves."""

    config_class: ClassVar[type[BaseModel]] = EmptyConfig

    def __init__(self, config: EmptyConfig | None = None, *, block_size: int) -> None:
        self._bs = block_size
        self._blocks: dict[tuple[str, tuple[int, ...]], int] = {}
        self._children: dict[tuple[str, tuple[int, ...]], int] = {}
        self._last: dict[tuple[str, tuple[int, ...]], int] = {}
        self._locks: dict[int, int] = {}
        self._clock = itertools.count()
        self._stats = PrefixCacheStats()

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def num_cached_blocks(self) -> int:
        return len(self._blocks)

    def _walk(self, token_ids: Sequence[int], key: str) -> list[tuple[str, tuple[int, ...]]]:
        path = []
        for end in range(self._bs, len(token_ids) + 1, self._bs):
            k = (key, tuple(token_ids[:end]))
            if k not in self._blocks:
                break
            path.append(k)
        return path

    def match(self, token_ids: Sequence[int], isolation_key: str = "") -> PrefixMatch:
        path = self._walk(token_ids, isolation_key)
        now = next(self._clock)
        for k in path:
            self._last[k] = now
        s = self._stats
        s.num_lookups += 1
        s.num_hits += bool(path)
        s.num_query_tokens += len(token_ids)
        s.num_matched_tokens += len(path) * self._bs
        return PrefixMatch(
            tuple(self._blocks[k] for k in path), len(path) * self._bs, len(token_ids), path
        )

    def insert(
        self, token_ids: Sequence[int], block_ids: Sequence[int], isolation_key: str = ""
    ) -> list[int]:
        n_full = len(token_ids) // self._bs
        cached = len(self._walk(token_ids, isolation_key))
        now = next(self._clock)
        new = []
        for i in range(cached, n_full):
            k = (isolation_key, tuple(token_ids[: (i + 1) * self._bs]))
            self._blocks[k] = block_ids[i]
            self._children[k] = 0
            self._last[k] = now
            if i > 0:
                self._children[(isolation_key, k[1][: -self._bs])] += 1
            new.append(block_ids[i])
        return new

    def lock(self, match: PrefixMatch) -> None:
        for b in match.block_ids:
            self._locks[b] = self._locks.get(b, 0) + 1

    def unlock(self, match: PrefixMatch) -> None:
        for b in match.block_ids:
            self._locks[b] -= 1
            if self._locks[b] == 0:
                del self._locks[b]

    def _drop(self, k: tuple[str, tuple[int, ...]]) -> int:
        block = self._blocks.pop(k)
        del self._children[k], self._last[k]
        if len(k[1]) > self._bs:
            self._children[(k[0], k[1][: -self._bs])] -= 1
        return block

    def evict(self, num_blocks: int) -> list[int]:
        out: list[int] = []
        while len(out) < num_blocks:
            leaves = [
                k
                for k, b in self._blocks.items()
                if self._children[k] == 0 and b not in self._locks
            ]
            if not leaves:
                break
            out.append(self._drop(min(leaves, key=self._last.__getitem__)))
        self._stats.num_evicted_blocks += len(out)
        return out

    def entries(self) -> Iterator[PrefixEntry]:
        for i, ((key, prefix), block) in enumerate(self._blocks.items()):
            ids = tuple(
                self._blocks[(key, prefix[:end])]
                for end in range(self._bs, len(prefix) + 1, self._bs)
            )
            yield PrefixEntry(i, hash(prefix), len(prefix), ids, key)
            del block

    def clear(self) -> list[int]:
        return self.evict(len(self._blocks))

    def make_stats(self) -> PrefixCacheStats:
        stats = self._stats
        stats.num_cached_blocks = len(self._blocks)
        self._stats = PrefixCacheStats()
        return stats


# --------------------------------------------------------------------------- eviction


class LRUPolicy:
    """Least recently used first; pinned keys skipped."""

    config_class: ClassVar[type[BaseModel]] = EmptyConfig

    def __init__(self, config: EmptyConfig | None = None, *, capacity: int = 0) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()
        self._pins: dict[Hashable, int] = {}
        self._stats = EvictionStats()

    def insert(
        self,
        key: Hashable,
        *,
        cost: float = 1.0,
        now: float | None = None,
        features: Mapping[str, float] | None = None,
    ) -> None:
        self._order[key] = None
        self._stats.num_inserts += 1

    def access(
        self,
        key: Hashable,
        *,
        now: float | None = None,
        features: Mapping[str, float] | None = None,
    ) -> None:
        self._order.move_to_end(key)
        self._stats.num_accesses += 1

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)
        self._pins.pop(key, None)

    def pin(self, key: Hashable) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Hashable) -> None:
        self._pins[key] -= 1
        if self._pins[key] == 0:
            del self._pins[key]

    def evict(self, num: int, context: PolicyContext | None = None) -> EvictionDecision:
        victims = list(itertools.islice((k for k in self._order if k not in self._pins), num))
        for k in victims:
            del self._order[k]
        self._stats.num_evictions += len(victims)
        return EvictionDecision(tuple(victims), "lru")

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def make_stats(self) -> EvictionStats:
        stats = self._stats
        stats.num_entries = len(self._order)
        self._stats = EvictionStats()
        return stats


# --------------------------------------------------------------------------- lifetime


class CountingPredictor:
    """Per ``access_count`` value, a histogram of observed reuse gaps over TTL buckets."""

    config_class: ClassVar[type[BaseModel]] = EmptyConfig
    EDGES = (1.0, 10.0, 60.0)  # bucket i: gap below EDGES[i]; the last: never within 60 s

    def __init__(self, config: EmptyConfig | None = None) -> None:
        self._last: dict[Hashable, tuple[float, int]] = {}
        self._hist: dict[int, list[int]] = {}
        self._stats = LifetimeStats()

    @staticmethod
    def _cell(features: Mapping[str, float]) -> int:
        return min(int(max(features.get("access_count", 0.0), 0.0)), 8)

    def _bucket(self, gap: float) -> int:
        return next((i for i, e in enumerate(self.EDGES) if gap < e), len(self.EDGES))

    def observe(self, key: Hashable, features: Mapping[str, float], now: float) -> None:
        self._stats.num_observations += 1
        prev = self._last.get(key)
        if prev is not None:
            hist = self._hist.setdefault(prev[1], [0] * (len(self.EDGES) + 1))
            hist[self._bucket(now - prev[0])] += 1
        self._last[key] = (now, self._cell(features))

    def predict(self, features: Mapping[str, float]) -> LifetimePrediction:
        self._stats.num_predictions += 1
        hist = self._hist.get(self._cell(features))
        if not hist:
            return LifetimePrediction(0.5, math.inf, len(self.EDGES))
        total = sum(hist)
        bucket = max(range(len(hist)), key=hist.__getitem__)
        ttl = self.EDGES[bucket] / 2 if bucket < len(self.EDGES) else math.inf
        reused = total - hist[-1]
        return LifetimePrediction((reused + 1) / (total + 2), ttl, bucket)

    def make_stats(self) -> LifetimeStats:
        stats = self._stats
        self._stats = LifetimeStats()
        return stats


# --------------------------------------------------------------------------- scheduler


class FCFSConfig(BaseModel):
    model_config = _FROZEN
    max_num_seqs: int = Field(4, ge=1)
    max_num_batched_tokens: int = Field(64, ge=1)


class _Req:
    __slots__ = ("request", "tokens", "num_computed", "block_ids", "num_output")

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.tokens = list(request.prompt_token_ids)
        self.num_computed = 0
        self.block_ids: list[int] = []
        self.num_output = 0


class FCFSScheduler:
    """vLLM v1's rule in a few lines: running first, then the queue; preempt the newest."""

    config_class: ClassVar[type[BaseModel]] = FCFSConfig

    def __init__(self, config: FCFSConfig, *, kv_pool: Any, max_model_len: int) -> None:
        self.config = config
        self.pool = kv_pool
        self.max_model_len = max_model_len
        self.bs = kv_pool.schema.block_size
        self.waiting: deque[_Req] = deque()
        self.running: list[_Req] = []
        self.step_id = 0
        self.finished: list[str] = []
        self.stats = SchedulerStats()

    def add_request(self, request: GenerationRequest) -> None:
        n = len(request.prompt_token_ids)
        if n > self.max_model_len:
            raise InvalidRequestError(f"prompt of {n} tokens > max_model_len {self.max_model_len}")
        if -(-n // self.bs) > self.pool.num_blocks:
            raise InvalidRequestError(f"prompt of {n} tokens does not fit in the KV pool")
        self.waiting.append(_Req(request))

    def _grow(self, r: _Req, num_tokens: int) -> bool:
        need = -(-num_tokens // self.bs) - len(r.block_ids)
        if need <= 0:
            return True
        got = self.pool.allocate(need)
        if got is None:
            return False
        r.block_ids.extend(got)
        return True

    def _release(self, r: _Req) -> None:
        self.pool.free(r.block_ids)
        r.block_ids = []
        r.num_computed = 0

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        planned: list[tuple[_Req, int]] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            r = self.running[i]
            n = min(len(r.tokens) - r.num_computed, budget)
            while not self._grow(r, r.num_computed + n):
                victim = self.running.pop()
                self._release(victim)
                self.waiting.appendleft(victim)
                preempted.append(victim.request.request_id)
                if victim is r:
                    break
            else:
                planned.append((r, n))
                budget -= n
                i += 1
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                r = self.waiting[0]
                n = min(len(r.tokens) - r.num_computed, budget)
                if not self._grow(r, r.num_computed + n):
                    break
                self.waiting.popleft()
                self.running.append(r)
                planned.append((r, n))
                budget -= n
        chunks = tuple(
            ScheduledChunk(
                request_id=r.request.request_id,
                token_ids=tuple(r.tokens[r.num_computed : r.num_computed + n]),
                num_computed_tokens=r.num_computed,
                block_ids=tuple(r.block_ids),
                sample=r.num_computed + n == len(r.tokens),
                is_prefill=r.num_computed + n <= len(r.tokens) - 1 or r.num_output == 0,
            )
            for r, n in planned
        )
        self.step_id += 1
        total = sum(len(c.token_ids) for c in chunks)
        s = self.stats
        s.num_steps += 1
        s.num_scheduled_tokens += total
        s.num_preemptions += len(preempted)
        out = SchedulerOutput(
            step_id=self.step_id,
            chunks=chunks,
            num_scheduled_tokens=total,
            preempted_request_ids=tuple(preempted),
            finished_request_ids=tuple(self.finished),
            num_waiting=len(self.waiting),
            num_running=len(self.running),
        )
        self.finished = []
        return out

    def build_plan(self, output: SchedulerOutput) -> ExecutionPlan:
        nodes: list[IRNode] = []
        for is_prefill, group in itertools.groupby(output.chunks, key=lambda c: c.is_prefill):
            kind = IRNodeKind.PREFILL_CHUNK if is_prefill else IRNodeKind.DECODE_BATCH
            seqs = tuple(
                SequenceChunk(
                    c.request_id, c.token_ids, c.num_computed_tokens, c.block_ids, c.sample
                )
                for c in group
            )
            nodes.append(IRNode(len(nodes), kind, (len(nodes) - 1,) if nodes else (), seqs))
        return ExecutionPlan(
            output.step_id, IRGraph(tuple(nodes)), tuple(c.request_id for c in output.chunks)
        )

    def _find(self, request_id: str) -> _Req | None:
        for r in itertools.chain(self.running, self.waiting):
            if r.request.request_id == request_id:
                return r
        return None

    def update_from_output(
        self, output: SchedulerOutput, sampled_token_ids: Mapping[str, Sequence[int]]
    ) -> None:
        done = []
        for c in output.chunks:
            r = self._find(c.request_id)
            if r is None:
                continue
            r.num_computed = c.num_computed_tokens + len(c.token_ids)
            new = sampled_token_ids.get(c.request_id, ())
            r.tokens.extend(new)
            r.num_output += len(new)
            max_tokens = r.request.sampling.max_tokens
            if (max_tokens is not None and r.num_output >= max_tokens) or len(
                r.tokens
            ) >= self.max_model_len:
                done.append(c.request_id)
        self.finish_requests(done, FinishReason.LENGTH)

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> None:
        for rid in request_ids:
            r = self._find(rid)
            if r is None:
                continue
            if r in self.running:
                self.running.remove(r)
            else:
                self.waiting.remove(r)
            self._release(r)
            self.finished.append(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def make_stats(self) -> SchedulerStats:
        stats = self.stats
        stats.num_waiting, stats.num_running = len(self.waiting), len(self.running)
        self.stats = SchedulerStats()
        return stats
