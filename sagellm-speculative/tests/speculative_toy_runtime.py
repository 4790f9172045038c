"""A runtime whose model is a formula over the tokens its KV pool holds (test double).

It implements core's Runtime protocol closely enough for a model-based proposer: every
chunk's tokens are written into the pool at their positions through the chunk's block
table, and a sampled position's logits come from the tokens stored in the pool for
positions 0..p only, so a proposer that keeps stale or missing KV gets other drafts.
``next_token(context, skip)`` is the model; skipping layers changes it in a known way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from sagellm.core.types import CapabilityDescriptor, ExecutionPlan, KVCacheSchema, ModelOutput

VOCAB = 64
LAYERS = 5


def next_token(context: Sequence[int], skip: Sequence[int] = ()) -> int:
    """The toy model's greedy continuation of ``context``."""
    return (3 * context[-1] + 5 * len(context) + 7 * sum(skip)) % VOCAB


class ToyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "toy"
    device: str = "cpu"
    skip_layers: tuple[int, ...] = ()


class ToyPool:
    """Blocks of token ids (the part of KVPool a proposer uses)."""

    def __init__(self, schema: KVCacheSchema, num_blocks: int) -> None:
        self.schema = schema
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))
        self.slots: dict[int, int] = {}  # slot -> token id written there

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        got, self._free = self._free[:n], self._free[n:]
        return got

    def free(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            assert b not in self._free, f"block {b} freed twice"
            self._free.append(b)
            for off in range(self.schema.block_size):
                self.slots.pop(b * self.schema.block_size + off, None)


class ToyRuntime:
    config_class: ClassVar[type[BaseModel]] = ToyConfig

    def __init__(self, config: ToyConfig | None = None, **_context: Any) -> None:
        self.config = config or ToyConfig()
        self.skip = tuple(self.config.skip_layers)
        self.pool: ToyPool | None = None
        self.executed: list[ExecutionPlan] = []

    def capabilities(self) -> CapabilityDescriptor:
        return CapabilityDescriptor(name="toy", max_model_len=4096)

    def kv_cache_schema(self, block_size: int, dtype: str | None = None) -> KVCacheSchema:
        return KVCacheSchema(
            num_layers=LAYERS - len(self.skip), num_kv_heads=1, head_dim=1, block_size=block_size
        )

    def bind_kv_pool(self, pool: Any) -> None:
        self.pool = pool

    def set_skip_layers(self, skip: Sequence[int]) -> None:
        self.skip = tuple(sorted(skip))
        self.pool = None

    def execute(self, plan: ExecutionPlan) -> ModelOutput:
        assert self.pool is not None, "no pool bound"
        self.executed.append(plan)
        bs = self.pool.schema.block_size
        rows, rids = [], []
        for c in plan.compute_chunks:
            for i, tok in enumerate(c.token_ids):
                pos = c.start_position + i
                self.pool.slots[c.block_ids[pos // bs] * bs + pos % bs] = tok
            if not c.sample:
                continue
            last = c.start_position + len(c.token_ids) - 1
            for p in range(last - c.num_logits + 1, last + 1):
                context = [
                    self.pool.slots[c.block_ids[q // bs] * bs + q % bs] for q in range(p + 1)
                ]
                row = torch.full((VOCAB,), -10.0)
                row[next_token(context, self.skip)] = 10.0
                rows.append(row)
                rids.append(c.request_id)
        return ModelOutput(tuple(rids), torch.stack(rows))
