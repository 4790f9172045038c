"""Configuration of the schedulers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AdaptiveSchedulerConfig",
    "CostAwareSchedulerConfig",
    "FCFSSchedulerConfig",
    "FairSchedulerConfig",
    "PDSchedulerConfig",
    "PrioritySchedulerConfig",
    "SLOSchedulerConfig",
]


class FCFSSchedulerConfig(BaseModel):
    """Budgets of the first-come-first-served scheduler (vLLM's names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_seqs: int = Field(64, ge=1)  # requests computed in one step
    max_num_batched_tokens: int = Field(2048, ge=1)  # token budget of one step
    long_prefill_token_threshold: int = Field(0, ge=0)  # cap of one request's chunk (0: none)
    enable_chunked_prefill: bool = True  # False: a prompt waits until it fits whole
    # Admission control: a request that would exceed these limits of the waiting queue is
    # held in arrival order until there is room ("queue") or refused ("reject").
    max_waiting: int = Field(0, ge=0)  # waiting requests (0: no limit)
    max_queue_tokens: int = Field(0, ge=0)  # prompt tokens of waiting requests (0: no limit)
    admission: Literal["queue", "reject"] = "queue"


class PrioritySchedulerConfig(FCFSSchedulerConfig):
    """FCFS budgets plus priority preemption."""

    preempt_for_priority: bool = True  # a better waiting request preempts the worst running one
    # ... unless that one has computed more tokens than this (0: no limit): recompute is costly
    max_victim_computed_tokens: int = Field(0, ge=0)


class FairSchedulerConfig(FCFSSchedulerConfig):
    """Deficit round-robin over tenants' waiting queues."""

    quantum: int = Field(256, ge=1)  # prompt tokens a weight-1 tenant may admit per round
    weights: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict
    )  # tenant -> weight (default 1.0)


class CostAwareSchedulerConfig(FCFSSchedulerConfig):
    """Step-cost model shared by the policies that learn it from ``observe_step``."""

    step_overhead_ms: float = Field(15.0, ge=0)  # prior of a: fixed cost of one step
    per_token_ms: float = Field(1.5, ge=0)  # prior of b: cost of one more token
    ewma: float = Field(0.1, ge=0, le=1)  # weight of a new step timing in the fit
    # Floor of a step's prefill tokens while prefill is pending, so it always progresses
    # (0: one KV block).
    min_prefill_tokens: int = Field(0, ge=0)


class SLOSchedulerConfig(CostAwareSchedulerConfig):
    """Least-slack-first service under TTFT/TPOT objectives."""

    default_ttft_ms: float | None = Field(None, gt=0)  # for requests without slo.ttft_ms
    default_tpot_ms: float | None = Field(None, gt=0)  # for requests without slo.tpot_ms
    # Requests that can no longer meet TTFT go last, and their decodes stop capping prefill.
    demote_missed: bool = True


class AdaptiveSchedulerConfig(CostAwareSchedulerConfig):
    """FCFS whose per-step prefill budget keeps the predicted step time within TPOT."""

    target_tpot_ms: float = Field(100.0, gt=0)  # TPOT objective of requests without slo.tpot_ms
    target_ttft_ms: float | None = Field(None, gt=0)  # TTFT objective without slo.ttft_ms


class PDSchedulerConfig(FCFSSchedulerConfig):
    """Separate prefill and decode queues and budgets inside one engine."""

    prefill_token_budget: int = Field(1536, ge=1)  # prefill tokens per step
    decode_token_budget: int = Field(512, ge=1)  # decode tokens per step
    max_num_prefill_seqs: int = Field(16, ge=1)  # requests prefilling at once
    max_num_decode_seqs: int = Field(64, ge=1)  # requests decoding at once
    prefill_device: str = "prefill:0"  # IRNode.device hint of prefill nodes
    decode_device: str = "decode:0"  # IRNode.device hint of decode nodes
