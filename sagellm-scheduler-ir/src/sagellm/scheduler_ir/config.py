"""Configuration of the schedulers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AdaptiveSchedulerConfig",
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


class SLOSchedulerConfig(FCFSSchedulerConfig):
    """Least-slack-first admission under TTFT/TPOT objectives."""

    default_ttft_ms: float | None = Field(None, gt=0)  # for requests without slo.ttft_ms
    default_tpot_ms: float | None = Field(None, gt=0)  # for requests without slo.tpot_ms
    step_overhead_ms: float = Field(15.0, ge=0)  # a: fixed cost of one step
    per_token_ms: float = Field(1.5, ge=0)  # b: cost of one token (learned by observe_step)
    ewma: float = Field(0.2, ge=0, le=1)  # weight of a new observation in the estimate
    demote_missed: bool = True  # requests that can no longer meet TTFT go last


class AdaptiveSchedulerConfig(FCFSSchedulerConfig):
    """FCFS whose prefill share of the budget follows decode latency and queue depth."""

    target_tpot_ms: float = Field(50.0, gt=0)  # decode latency the running requests should see
    min_prefill_share: float = Field(0.1, gt=0, le=1)
    initial_prefill_share: float = Field(1.0, gt=0, le=1)
    step: float = Field(0.1, gt=0, le=1)  # change of the share per observation
    queue_high: int = Field(8, ge=1)  # waiting requests above which prefill grows


class PDSchedulerConfig(FCFSSchedulerConfig):
    """Separate prefill and decode queues and budgets inside one engine."""

    prefill_token_budget: int = Field(1536, ge=1)  # prefill tokens per step
    decode_token_budget: int = Field(512, ge=1)  # decode tokens per step
    max_num_prefill_seqs: int = Field(16, ge=1)  # requests prefilling at once
    max_num_decode_seqs: int = Field(64, ge=1)  # requests decoding at once
    prefill_device: str = "prefill:0"  # IRNode.device hint of prefill nodes
    decode_device: str = "decode:0"  # IRNode.device hint of decode nodes
