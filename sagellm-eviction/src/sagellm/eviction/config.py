"""Configuration of the eviction policies and of the trace generator.

Every policy has its own frozen model (unknown keys are rejected). The owner's size in
keys is not an option: it comes from the engine as construction context
(``capacity=<pool blocks>``), because the KV pool owns it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ARCConfig",
    "CostAwareConfig",
    "EvictionConfig",
    "FIFOConfig",
    "KVTraceConfig",
    "LFUConfig",
    "LRUConfig",
    "S3FIFOConfig",
    "SieveConfig",
    "ZipfTraceConfig",
]


class EvictionConfig(BaseModel):
    """Options every policy of this package shares (none yet): the base of their configs."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class LRUConfig(EvictionConfig):
    """Options of :class:`~sagellm.eviction.lru.LRUPolicy` (none)."""


class FIFOConfig(EvictionConfig):
    """Options of :class:`~sagellm.eviction.fifo.FIFOPolicy` (none)."""


class LFUConfig(EvictionConfig):
    """Options of :class:`~sagellm.eviction.lfu.LFUPolicy` (none)."""


class ARCConfig(EvictionConfig):
    """Options of :class:`~sagellm.eviction.arc.ARCPolicy` (none: ARC adapts itself)."""


class SieveConfig(EvictionConfig):
    """Options of :class:`~sagellm.eviction.sieve.SievePolicy` (none)."""


class S3FIFOConfig(EvictionConfig):
    """Options of :class:`~sagellm.eviction.s3fifo.S3FIFOPolicy` (libCacheSim's defaults)."""

    # share of the capacity given to the small (probationary) FIFO; the rest is main
    small_size_ratio: float = Field(0.1, gt=0.0, lt=1.0)
    # ghost FIFO of keys evicted from small, in keys, as a share of the capacity
    ghost_size_ratio: float = Field(0.9, ge=0.0, le=10.0)
    # hits a key needs while in small to move to main instead of the ghost
    move_to_main_threshold: int = Field(2, ge=1, le=1000)


class CostAwareConfig(EvictionConfig):
    """Options of :class:`~sagellm.eviction.cost_aware.CostAwarePolicy`."""

    # reuse weight used without a predictor: "frequency" (accesses so far, GDSF-like)
    # or "none" (1 for every key: plain GreedyDual on cost)
    reuse_without_predictor: str = Field("frequency", pattern="^(frequency|none)$")
    # lower bound of the reuse weight, so an entry the predictor gives up on still
    # carries some of its cost (0 lets such entries go first, ties in insertion order)
    min_reuse: float = Field(0.01, ge=0.0, le=1.0)
    # the heap is rebuilt without stale entries once it holds this many per live key
    heap_compaction_factor: float = Field(4.0, ge=1.5, le=100.0)
    # with a predictor: how many of the key's own observed gaps the prediction is worth
    # when both are blended (0: the key's history alone once it has one)
    prior_weight: float = Field(2.0, ge=0.0, le=1000.0)
    # with a predictor: multiplicative-weights rate of the choice between the predicted
    # ranking and frequency, per regretted eviction (LeCaR's 0.45)
    learning_rate: float = Field(0.45, gt=0.0, le=10.0)


class ZipfTraceConfig(BaseModel):
    """A synthetic trace: ``num_requests`` draws over ``num_objects`` keys, P(rank k) ~ k^-alpha."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_objects: int = Field(10_000, ge=1)
    num_requests: int = Field(100_000, ge=1)
    alpha: float = Field(1.0, ge=0.0, le=5.0)
    seed: int = 0


class KVTraceConfig(BaseModel):
    """An LLM serving workload seen as KV-block accesses (see :mod:`sagellm.eviction.trace`).

    Defaults sketch a small chat service: 1 new request or session per second for 10 minutes, half of them turns
    of multi-turn chats (about 4 turns, a minute of user think time between turns), the
    rest few-shot requests on shared templates, plain completions behind a system prompt
    and one-off prompts. Lengths are log-normal around figures typical of chat datasets
    (ShareGPT-like: prompts of a few hundred tokens, answers of a few hundred).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    # tokens per KV block (vLLM's default)
    block_size: int = Field(16, ge=1, le=1024)
    # new requests (chat sessions count once, at their first turn) per second, Poisson
    arrival_rate: float = Field(1.0, gt=0.0)
    # simulated wall time in seconds; later turns of open chats are cut at the end
    duration_seconds: float = Field(600.0, gt=0.0)
    # request mix of new arrivals: chat, few-shot, completion, one-off (normalised)
    chat_share: float = Field(0.5, ge=0.0)
    few_shot_share: float = Field(0.2, ge=0.0)
    completion_share: float = Field(0.2, ge=0.0)
    one_off_share: float = Field(0.1, ge=0.0)
    # shared system prompts: how many, how popular (Zipf exponent), how long (tokens)
    num_system_prompts: int = Field(6, ge=1)
    system_prompt_alpha: float = Field(1.0, ge=0.0)
    system_prompt_tokens: tuple[int, int] = (200, 1200)
    # few-shot templates (each behind a system prompt): count, popularity, length
    num_templates: int = Field(40, ge=1)
    template_alpha: float = Field(0.9, ge=0.0)
    template_tokens: tuple[int, int] = (400, 1600)
    # turns of a chat session: geometric with this mean, capped
    mean_turns: float = Field(4.0, ge=1.0)
    max_turns: int = Field(30, ge=1)
    # seconds between the end of an answer and the next user message (exponential mean)
    mean_think_seconds: float = Field(60.0, gt=0.0)
    # median tokens of a user message / a question / an answer (log-normal, sigma 0.8)
    median_user_tokens: int = Field(120, ge=1)
    median_question_tokens: int = Field(60, ge=1)
    median_answer_tokens: int = Field(250, ge=1)
    # decode speed used to place the end of an answer in time (tokens per second)
    decode_tokens_per_second: float = Field(30.0, gt=0.0)
    # tenants issuing requests (uniformly); tenant_hash is a stable hash of the tenant
    num_tenants: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _check(self) -> KVTraceConfig:
        for name in ("system_prompt_tokens", "template_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(
                    f"{name} must be (low, high) with 1 <= low <= high, got {(lo, hi)}"
                )
        total = self.chat_share + self.few_shot_share + self.completion_share + self.one_off_share
        if total <= 0:
            raise ValueError(
                "at least one of chat_share, few_shot_share, completion_share, one_off_share "
                "must be positive"
            )
        return self
