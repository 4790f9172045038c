"""ScheduleReplayRuntime: the engine's schedule on the replay clock, without the model.

On the replay clock (:mod:`sagellm.engine.replay`) a step lasts what the step-cost model
predicts for its shape, whatever the forward pass took. When nothing the scheduler
decides depends on the tokens the model produces — fixed output lengths (``ignore_eos``,
no stop strings) and prompts that do not repeat generated text — the schedule
(admissions, chunking, preemptions, TTFT, TPOT, SLO attainment) depends only on the
workload and the policy. Then the forward pass can be left out: this runtime lays out
the same KV schema as the native runtime for the model (so the pool has the same
blocks), and answers every sampled row with the same logits, one fixed token. A
policy comparison over many seeds then takes seconds instead of the model's step time
per step: the idea of Vidur and DistServe's simulators, here running the engine's own
scheduler, pool and step loop rather than a re-implementation of them.

The tokens it returns are not a model's: it refuses to step until
:meth:`ScheduleReplayRuntime.use_clock` gives it a virtual clock, and the engine tests
check that a replay through it gives exactly the per-request times of a replay through
the native runtime.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from sagellm.core.errors import CapabilityMismatchError, SageLLMError
from sagellm.core.protocols import KVPool
from sagellm.core.types import (
    KV_CACHE_DTYPES,
    CapabilityDescriptor,
    ExecutionPlan,
    KVCacheSchema,
    ModelOutput,
)
from sagellm.engine.models.loader import read_config
from sagellm.engine.models.source import resolve_model
from sagellm.engine.runtime.native import KV_DTYPES, kv_schema_of, resolve_dtype

__all__ = ["ScheduleReplayRuntime", "ScheduleReplayRuntimeConfig"]


class ScheduleReplayRuntimeConfig(BaseModel):
    """The fields of :class:`NativeRuntimeConfig` that shape the KV pool."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "smollm2-135m"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: str = "cpu"
    max_model_len: int | None = Field(None, ge=1)
    kv_cache_dtype: Literal["auto", "int8", "fp8_e4m3", "fp8_e5m2"] = "auto"


class ScheduleReplayRuntime:
    """A runtime (core protocol) that computes nothing; see the module doc."""

    config_class: ClassVar[type[BaseModel]] = ScheduleReplayRuntimeConfig

    def __init__(self, config: ScheduleReplayRuntimeConfig | None = None) -> None:
        self.config = cfg = config or ScheduleReplayRuntimeConfig()
        self.source = resolve_model(cfg.model)
        self.model_config = read_config(self.source)
        self.dtype = resolve_dtype(cfg.dtype, torch.device(cfg.device))
        self.max_model_len = cfg.max_model_len or self.model_config.max_position_embeddings
        eos = set(self.model_config.eos_token_ids or ())
        # the token every sampled row gets: the first one that ends nothing
        self.token = next(t for t in range(self.model_config.vocab_size) if t not in eos)
        self._pool: KVPool | None = None
        self._clock: Any = None
        self.steps = 0

    def use_clock(self, clock: Any) -> None:
        """Step on ``clock``, which must be virtual (a :class:`ReplayClock`)."""
        if not getattr(clock, "virtual", False):
            raise CapabilityMismatchError(
                "the schedule replay runtime computes no tokens, so its steps have no real "
                "duration: it runs only on a replay clock (sagellm.engine.replay.ReplayClock)"
            )
        self._clock = clock

    def capabilities(self) -> CapabilityDescriptor:
        """What the native runtime offers for this model (the builder checks the same)."""
        return CapabilityDescriptor(
            name=f"schedule_replay:{self.source.name}",
            devices=("cpu", "cuda"),
            dtypes=("float32", "bfloat16"),
            kv_dtypes=tuple(sorted(KV_DTYPES)),  # type: ignore[arg-type]
            kv_schema=self.kv_cache_schema(16),
            max_model_len=self.model_config.max_position_embeddings,
            features=("paged_attention", "chunked_prefill", "prefix_caching", "mixed_batch"),
        )

    def kv_cache_schema(self, block_size: int, dtype: str | None = None) -> KVCacheSchema:
        """The native runtime's layout for this model (so the pool has as many blocks)."""
        choice = dtype or self.config.kv_cache_dtype
        name = KV_CACHE_DTYPES.get(choice, choice)
        if name == "auto":
            name = str(self.dtype).removeprefix("torch.")
        return kv_schema_of(self.model_config, block_size, name)

    def bind_kv_pool(self, pool: KVPool) -> None:
        """Keep ``pool`` (its blocks are allocated and freed by the engine as usual)."""
        if pool.schema.num_layers != self.model_config.num_layers:
            raise CapabilityMismatchError(
                f"pool schema has {pool.schema.num_layers} layers, the model "
                f"{self.model_config.num_layers}"
            )
        self._pool = pool

    def execute(self, plan: ExecutionPlan) -> ModelOutput:
        """One row per sampled position (``num_logits`` per sampled chunk), every row
        picking :attr:`token`; nothing is computed or written."""
        if self._clock is None:
            raise SageLLMError(
                "ScheduleReplayRuntime.execute before use_clock(replay_clock): it replays "
                "schedules on the replay clock only"
            )
        if self._pool is None:
            raise SageLLMError("ScheduleReplayRuntime.execute before bind_kv_pool(pool)")
        ids: list[str] = []
        for c in plan.compute_chunks:
            if c.sample:
                ids.extend([c.request_id] * c.num_logits)
        logits = torch.zeros(len(ids), self.model_config.vocab_size, dtype=torch.float32)
        logits[:, self.token] = 1.0
        self.steps += 1
        return ModelOutput(tuple(ids), logits)
