"""Plain data that crosses package lines.

Two kinds of types live here:

* request-level and descriptive types (sampling parameters, schemas, capability
  descriptors, plans) are frozen pydantic models: validated once, serialisable, and the
  error message of a bad value says which field and what is accepted;
* hot-path types built once per engine step (scheduler output, IR nodes, block infos)
  are frozen slotted dataclasses: cheap to build thousands of times per second.

Nothing here holds a tensor or an internal handle of a component.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AccelConfig",
    "AllocationResult",
    "BlockShape",
    "CapabilityDescriptor",
    "CoTStep",
    "CoTVote",
    "CommConfig",
    "DType",
    "DTYPE_BYTES",
    "KV_CACHE_DTYPES",
    "EvictionDecision",
    "ExecutionPlan",
    "FinishReason",
    "GenerationRequest",
    "IRGraph",
    "IRNode",
    "IRNodeKind",
    "KVBlockInfo",
    "KVCacheSchema",
    "LifetimePrediction",
    "MigrationDecision",
    "MigrationPlan",
    "MigrationResult",
    "PolicyContext",
    "CompletionOutput",
    "DraftRequest",
    "ModelOutput",
    "OverlapOp",
    "OverlapOpKind",
    "RequestMetrics",
    "RequestOutput",
    "PackedWeight",
    "PrefixEntry",
    "PrefixMatch",
    "QuantizationProfile",
    "RequestKind",
    "RequestStatus",
    "SamplingParams",
    "SelfConsistency",
    "ScheduledChunk",
    "SchedulerOutput",
    "SequenceChunk",
    "SLO",
    "SparsityProfile",
    "SpeculativeDraft",
    "TopologyInfo",
    "TransferPlan",
]

#: Element types a KV cache or a model may use, by their torch names.
DType = Literal["float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "int8", "uint8"]

#: Bytes per element of each :data:`DType`.
DTYPE_BYTES: Mapping[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

#: KV cache element type of each quantized ``EngineConfig.kv_cache_dtype`` choice
#: (``"auto"`` keeps the compute dtype). Each stores a float16 scale per token-head row.
KV_CACHE_DTYPES: Mapping[str, DType] = {
    "int8": "int8",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}

_FROZEN = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- requests


class RequestKind(str, enum.Enum):
    """What a request looks like to KV policies (a feature for reuse prediction)."""

    CHAT = "chat"  # multi-turn conversation: its prefix returns with the next turn
    COMPLETION = "completion"  # a plain prompt
    FEW_SHOT = "few_shot"  # a shared template followed by a short question
    ONE_OFF = "one_off"  # not expected to be reused


class RequestStatus(str, enum.Enum):
    """Life cycle of a request inside a scheduler."""

    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # holds KV blocks, scheduled every step
    PREEMPTED = "preempted"  # blocks released; recomputed when re-admitted
    FINISHED = "finished"  # done, every block released


class FinishReason(str, enum.Enum):
    """Why a request stopped, with OpenAI's names."""

    STOP = "stop"  # a stop string, a stop token or end of sequence
    LENGTH = "length"  # max_tokens or the context length was reached
    ABORT = "abort"  # aborted by the caller or a disconnected client
    REJECTED = "rejected"  # refused by admission control


class SamplingParams(BaseModel):
    """How to pick tokens; the field names and meanings follow vLLM and OpenAI.

    Validation happens here once, so an engine never sees an impossible value.
    """

    model_config = _FROZEN

    n: int = Field(1, ge=1, le=128)  # completions returned per prompt
    max_tokens: int | None = Field(16, ge=1)  # None: until the context is full
    temperature: float = Field(1.0, ge=0.0, le=100.0)  # 0 means greedy
    top_k: int = Field(0, ge=0)  # 0 disables top-k
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # nucleus mass kept
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # drop tokens below min_p * p(top token)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # CTRL-style, >1 discourages
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # OpenAI: once per seen token
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # OpenAI: per occurrence
    seed: int | None = None  # fixes the random stream of this request
    stop: tuple[str, ...] = ()  # strings that end generation (not returned by default)
    stop_token_ids: tuple[int, ...] = ()  # token ids that end generation
    ignore_eos: bool = False  # keep going past the end-of-sequence token
    include_stop_str_in_output: bool = False  # return the stop string that matched
    logprobs: int | None = Field(None, ge=0, le=20)  # top-k logprobs per sampled token
    skip_special_tokens: bool = True  # drop special tokens when detokenizing
    thinking_token_budget: int | None = Field(None, ge=0)  # most tokens between think markers

    @property
    def greedy(self) -> bool:
        """True when the argmax is taken (temperature 0)."""
        return self.temperature == 0.0


class SLO(BaseModel):
    """Latency objectives of one request; ``None`` means no objective."""

    model_config = _FROZEN

    ttft_ms: float | None = Field(None, gt=0)  # time to first token
    tpot_ms: float | None = Field(None, gt=0)  # time per output token after the first


class GenerationRequest(BaseModel):
    """A request as it enters an engine: tokenized prompt plus how to continue it."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    request_id: str = Field(min_length=1)  # unique among live requests
    prompt_token_ids: tuple[int, ...]  # the tokenized prompt, at least one token
    sampling: SamplingParams = SamplingParams()
    arrival_time: float = 0.0  # time.monotonic() when received
    priority: int = 0  # lower value is served first (vLLM's convention)
    tenant: str = ""  # owner, for quotas and fairness
    cache_salt: str = ""  # isolation key: prefixes are shared only within one salt
    # True: the request neither starts from a cached prefix nor offers its blocks to the
    # prefix index, so its blocks go straight back to the pool when it ends (requests
    # that must compute every prompt row: embeddings, prompt logprobs)
    skip_prefix_cache: bool = False
    kind: RequestKind = RequestKind.COMPLETION
    slo: SLO = SLO()
    eos_token_ids: tuple[int, ...] = ()  # end-of-sequence ids of the model's tokenizer

    @model_validator(mode="after")
    def _non_empty(self) -> GenerationRequest:
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids is empty: a request needs at least one token")
        return self

    @property
    def isolation_key(self) -> str:
        """Key that separates prefix caches: tenant and cache salt together."""
        return f"{self.tenant}\x00{self.cache_salt}" if (self.tenant or self.cache_salt) else ""


# --------------------------------------------------------------------------- KV cache


class KVCacheSchema(BaseModel):
    """Shape and element type of a paged KV cache.

    A block holds ``block_size`` consecutive token positions of one sequence for every
    layer; per layer the key and value storage are laid out as
    ``[num_blocks, block_size, num_kv_heads, head_size]``, where ``head_size`` is
    ``head_dim`` for an unquantized cache. A quantized cache (a 1-byte ``dtype``: int8,
    float8_e4m3fn, float8_e5m2) stores after each token-head's ``head_dim`` values its
    quantization scale in ``scale_bytes`` more bytes (a float16 bit-cast into 2 elements),
    so a block's bytes hold values and scales together and move as one.
    """

    model_config = _FROZEN

    num_layers: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    block_size: int = Field(16, ge=1, le=4096)  # tokens per block
    dtype: DType = "float32"  # element type of the stored keys and values
    layout: Literal["NHD"] = "NHD"  # [block, token, head, dim]
    # bytes after each token-head's head_dim elements holding its quantization scale
    # (a whole number of elements); 0 for an unquantized cache
    scale_bytes: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_scale_bytes(self) -> KVCacheSchema:
        if self.scale_bytes % DTYPE_BYTES[self.dtype]:
            raise ValueError(
                f"scale_bytes={self.scale_bytes} is not a whole number of {self.dtype} "
                f"elements ({DTYPE_BYTES[self.dtype]} bytes each)"
            )
        return self

    @property
    def is_quantized(self) -> bool:
        """True when every token-head row carries its own scale."""
        return self.scale_bytes > 0

    @property
    def head_size(self) -> int:
        """Elements of one stored token-head row: ``head_dim`` values, then the scale."""
        return self.head_dim + self.scale_bytes // DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers, keys and values (scales included)."""
        row = self.head_dim * DTYPE_BYTES[self.dtype] + self.scale_bytes
        return 2 * self.num_layers * self.num_kv_heads * row

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block occupies across all layers, keys and values."""
        return self.bytes_per_token * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True, slots=True)
class KVBlockInfo:
    """What a pool or tier knows about one block."""

    block_id: int  # id within its tier
    tier: str  # "device", "host", "disk", ...
    size_bytes: int  # bytes the block occupies in that tier
    ref_count: int  # holders of the block; 0 means free
    tenant_id: str = ""  # owner charged for it
    last_access: float = 0.0  # time.monotonic() of the last touch


@dataclass(frozen=True, slots=True)
class AllocationResult:
    """Blocks handed out by a tiered store."""

    block_ids: tuple[int, ...]
    tier: str


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """Move or copy blocks between tiers; ``dst_block_ids`` is filled by the planner."""

    src_tier: str
    dst_tier: str
    block_ids: tuple[int, ...]  # blocks in the source tier
    dst_block_ids: tuple[int, ...] = ()  # their places in the destination tier
    keep_source: bool = False  # copy instead of move


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """Outcome of executing a :class:`MigrationPlan`."""

    plan: MigrationPlan
    num_bytes: int  # bytes moved
    seconds: float  # wall time of the copy

    @property
    def bandwidth_gbps(self) -> float:
        """Achieved bandwidth in GB/s (1e9 bytes)."""
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


@dataclass(frozen=True, slots=True)
class MigrationDecision:
    """A migration a policy proposes, with its estimated benefit (seconds saved)."""

    plan: MigrationPlan
    net_benefit: float


# --------------------------------------------------------------------------- prefix reuse


@dataclass(frozen=True, slots=True)
class PrefixEntry:
    """A cached prefix as an index reports it."""

    entry_id: int  # node or block-hash id inside the index
    token_hash: int  # hash of the tokens up to and including this entry
    token_length: int  # tokens covered from the start of the sequence
    kv_block_ids: tuple[int, ...]  # blocks holding those tokens, in order
    isolation_key: str = ""  # tenant / cache salt the entry belongs to


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """Result of a prefix lookup (the seeds' ``PrefixHit``).

    ``num_tokens`` is always a multiple of the block size and never more than the tokens
    looked up; ``block_ids`` holds ``num_tokens // block_size`` blocks.
    """

    block_ids: tuple[int, ...]  # cached blocks covering the matched prefix, in order
    num_tokens: int  # matched_length: tokens whose KV is cached
    num_query_tokens: int  # tokens that were looked up
    handle: Any = None  # opaque index handle to pass back to lock/unlock

    @property
    def remaining_tokens(self) -> int:
        """Tokens that still need prefill."""
        return self.num_query_tokens - self.num_tokens

    @property
    def hit(self) -> bool:
        """True when at least one block matched."""
        return self.num_tokens > 0


# --------------------------------------------------------------------------- eviction


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What an eviction or migration policy may look at when deciding."""

    now: float = 0.0  # logical or wall time of the decision
    pool_utilization: float = 0.0  # fraction of blocks in use
    tenant_usage: Mapping[str, int] = field(default_factory=dict)  # blocks per tenant
    tenant_quota: Mapping[str, int] = field(default_factory=dict)  # limit per tenant


@dataclass(frozen=True, slots=True)
class EvictionDecision:
    """Victims chosen by a policy, best victim first."""

    victims: tuple[Any, ...]  # keys, each currently held and not pinned
    reason: str = ""  # policy-specific note, e.g. "lru" or "ghost-hit"


@dataclass(frozen=True, slots=True)
class LifetimePrediction:
    """A predicted reuse of a KV block or prefix."""

    reuse_probability: float  # P(accessed again within the predictor's horizon)
    ttl_seconds: float  # expected time to next access (inf if never)
    ttl_bucket: int  # index of the bucket ttl_seconds falls in


# --------------------------------------------------------------------------- scheduling IR


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """One request's share of a step, as a scheduler decided it.

    The runtime computes KV for ``token_ids`` at positions
    ``num_computed_tokens .. num_computed_tokens + len(token_ids) - 1`` into the blocks of
    ``block_ids`` and, when ``sample`` is set, returns logits of the last position.
    """

    request_id: str
    token_ids: tuple[int, ...]  # tokens computed this step (a prefill chunk or decode)
    num_computed_tokens: int  # tokens whose KV is already in the cache before this step
    block_ids: tuple[int, ...]  # the request's whole block table after allocation
    sample: bool  # this chunk reaches the end of the known tokens: sample the next one
    is_prefill: bool  # the chunk is part of the prompt (or of a recomputation)
    num_draft_tokens: int = 0  # trailing speculative tokens to verify


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """What one ``Scheduler.schedule()`` call decided; plain ids and counts."""

    step_id: int  # increases by one per call
    chunks: tuple[ScheduledChunk, ...]  # every request computed this step, running first
    num_scheduled_tokens: int  # sum of len(chunk.token_ids)
    preempted_request_ids: tuple[str, ...] = ()  # lost their blocks this step (recompute)
    finished_request_ids: tuple[str, ...] = ()  # finished since the previous step
    rejected_request_ids: tuple[str, ...] = ()  # refused by admission control this step
    migrations: tuple[MigrationPlan, ...] = ()  # tier moves to run before the forward pass
    num_waiting: int = 0  # queue depth after this step
    num_running: int = 0  # requests holding blocks after this step


class IRNodeKind(str, enum.Enum):
    """Operations an execution plan is made of."""

    PREFILL_CHUNK = "prefill_chunk"  # compute KV (and maybe logits) of prompt tokens
    DECODE_BATCH = "decode_batch"  # one (or 1 + drafts) token per running request
    KV_MIGRATE = "kv_migrate"  # move blocks between tiers of one instance
    KV_TRANSFER = "kv_transfer"  # send blocks to another instance
    SAMPLE = "sample"  # pick next tokens from the logits of the compute nodes


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    """The runtime's view of one request inside a compute node."""

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int  # position of token_ids[0]
    block_ids: tuple[int, ...]  # block table covering start_position + len(token_ids)
    sample: bool  # return logits of the last position
    num_logits: int = 1  # with sample: logit rows of the last positions (1 + drafts to verify)


@dataclass(frozen=True, slots=True)
class IRNode:
    """One operation of an :class:`IRGraph` (the seeds' ``IRNode``)."""

    node_id: int
    kind: IRNodeKind
    inputs: tuple[int, ...] = ()  # node ids this one depends on
    chunks: tuple[SequenceChunk, ...] = ()  # compute nodes: the sequences involved
    migrations: tuple[MigrationPlan, ...] = ()  # KV_MIGRATE nodes
    transfers: tuple[TransferPlan, ...] = ()  # KV_TRANSFER nodes
    device: str = ""  # placement hint ("" = the instance's default device)
    config: Mapping[str, Any] = field(default_factory=dict)  # pass-specific attributes

    @property
    def num_tokens(self) -> int:
        """Tokens computed by this node."""
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(frozen=True, slots=True)
class IRGraph:
    """A DAG of :class:`IRNode`; ``nodes`` is kept in a valid topological order."""

    nodes: tuple[IRNode, ...]

    def node(self, node_id: int) -> IRNode:
        """The node with ``node_id``; raises KeyError when absent."""
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def of_kind(self, kind: IRNodeKind) -> tuple[IRNode, ...]:
        """Nodes of one kind, in order."""
        return tuple(n for n in self.nodes if n.kind is kind)


@dataclass(frozen=True, slots=True)
class ExecutionPlan:
    """What a runtime executes for one step (the seeds' ``ExecutionPlan``)."""

    plan_id: int  # the scheduler step it was lowered from
    graph: IRGraph
    request_ids: tuple[str, ...]  # requests touched, in chunk order
    target_instance_id: str = ""  # instance that runs it ("" = local)

    @property
    def compute_chunks(self) -> tuple[SequenceChunk, ...]:
        """Chunks of every prefill and decode node, in graph order."""
        out: list[SequenceChunk] = []
        for n in self.graph.nodes:
            if n.kind is IRNodeKind.PREFILL_CHUNK or n.kind is IRNodeKind.DECODE_BATCH:
                out.extend(n.chunks)
        return tuple(out)


class OverlapOpKind(str, enum.Enum):
    """What one step of an overlap schedule does to one micro-batch at one layer."""

    COMPUTE = "compute"  # run the layer's compute on the micro-batch
    COMMUNICATE = "communicate"  # start the layer's collective (asynchronously)
    WAIT = "wait"  # block until that collective is done; its result feeds the next layer


@dataclass(frozen=True, slots=True)
class OverlapOp:
    """One entry of an overlap schedule: ``kind`` for ``micro_batch`` at ``layer``.

    A schedule is a tuple of these in execution order. A micro-batch's collective
    started by a COMMUNICATE op runs under the COMPUTE ops listed between it and its WAIT.
    """

    kind: OverlapOpKind
    layer: int  # 0-based layer index
    micro_batch: int  # 0-based index into the micro-batches of the step


# --------------------------------------------------------------------------- capability


class CapabilityDescriptor(BaseModel):
    """What a component or an instance can do; used to check assembly and to route."""

    model_config = _FROZEN

    name: str  # component or instance name
    devices: tuple[str, ...] = ("cpu",)  # device types it runs on
    dtypes: tuple[DType, ...] = ("float32",)  # element types it accepts
    # KV cache element types it can store and read (empty: not stated)
    kv_dtypes: tuple[DType, ...] = ()
    kv_schema: KVCacheSchema | None = None  # the KV layout it produces or expects
    max_model_len: int | None = None  # longest sequence (prompt + output)
    supports_prefill: bool = True  # can run prefill (P side of P/D separation)
    supports_decode: bool = True  # can run decode (D side)
    features: tuple[str, ...] = ()  # free-form flags: "prefix_cache", "speculative", ...


class QuantizationProfile(BaseModel):
    """How weights or the KV cache are quantized."""

    model_config = _FROZEN

    method: Literal[
        "none", "gguf", "int8", "int4", "fp8", "awq", "gptq", "smoothquant", "q4_0", "q4_1", "q8_0"
    ] = "none"
    weight_bits: int = Field(16, ge=1, le=32)
    activation_bits: int = Field(16, ge=1, le=32)
    kv_cache_dtype: DType | None = None  # None: same as the model's
    group_size: int | None = Field(None, ge=1)  # per-group scales; None: per channel
    symmetric: bool = True


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A projection weight as the checkpoint stores it, still quantized (GGUF blocks).

    A loader hands these to a quantizer's linear method instead of dequantizing them, so
    a method that computes on the same format (GGUF Q4_1 on the int4 kernel) keeps the
    checkpoint's exact values. Rows are independent, so rows can be stacked (q, k, v) and
    permuted (llama.cpp's rotary layout) on ``data`` without decoding it.
    """

    format: str  # "q4_0", "q4_1", "q8_0", ... (GGML type name, lower case)
    data: Any  # uint8 torch.Tensor [rows, bytes_per_row]: the raw blocks of each row
    shape: tuple[int, int]  # (rows, columns) of the decoded weight, torch order


class SparsityProfile(BaseModel):
    """What a sparsifier removes."""

    model_config = _FROZEN

    method: str = "none"  # sparsifier name: "magnitude", "wanda", "sparsegpt", "structured"
    # "unstructured" (any weight), "n:m" (at most n non-zeros in every m consecutive
    # input weights of a row), or "structured" (whole FFN channels and attention heads
    # removed, the matrices shrunk)
    pattern: Literal["unstructured", "n:m", "structured"] = "unstructured"
    sparsity: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of the pruned weights removed
    n: int | None = Field(None, ge=1)  # non-zeros kept per group of an n:m pattern
    m: int | None = Field(None, ge=2)  # group length of an n:m pattern
    calibrated: bool = False  # uses the model's activations on calibration text


@dataclass(frozen=True, slots=True)
class BlockShape:
    """The shapes of one decoder block after structured pruning (per-block sizes)."""

    intermediate_size: int  # SwiGLU channels kept
    num_heads: int  # query heads kept (a multiple of num_kv_heads)
    num_kv_heads: int  # key/value heads (the KV cache's layout, unchanged by pruning)


class AccelConfig(BaseModel):
    """Acceleration switches of an engine (the seeds' ``AccelConfig``)."""

    model_config = _FROZEN

    enable_quantization: bool = False
    method: str = "none"  # quantizer name in the sagellm.quantization group
    enable_sparsity: bool = False
    speculative_tokens: int = Field(0, ge=0, le=16)  # draft tokens per step
    draft_model: str | None = None  # model for a draft proposer
    enable_kernel_fusion: bool = False


@dataclass(frozen=True, slots=True)
class SpeculativeDraft:
    """Draft tokens a proposer suggests for one request.

    ``draft_probs`` is None for a deterministic proposer (n-gram lookup, suffix trees):
    the verifier then treats each draft token as drawn from a point mass, which keeps
    rejection sampling exact. A model-based proposer that samples its drafts gives the
    distribution it drew each one from, so the verifier can accept with min(1, p/q).
    """

    request_id: str
    token_ids: tuple[int, ...]  # proposed continuation, possibly empty
    draft_probs: Any = None  # float torch.Tensor [len(token_ids), vocab] or None (point mass)


@dataclass(frozen=True, slots=True)
class DraftRequest:
    """What a proposer sees of one request before a step."""

    request_id: str
    prompt_token_ids: Sequence[int]  # the request's prompt
    output_token_ids: Sequence[int]  # tokens generated so far (the last one has no KV yet)
    num_tokens: int  # most drafts the step can take for this request (0: propose none)
    # the target's final-norm hidden state at the last token (the row that predicted the
    # newest output token), float32 [hidden]; given to proposers whose class sets
    # ``needs_hidden_states = True`` (Medusa- and EAGLE-style heads), None otherwise
    hidden_state: Any = None

    @property
    def token_ids(self) -> list[int]:
        """Prompt followed by the output: the context a continuation extends."""
        return [*self.prompt_token_ids, *self.output_token_ids]


@dataclass(frozen=True, slots=True)
class CoTStep:
    """What a chain-of-thought controller asks of the engine for one request.

    Forced tokens go through the same path as sampled ones (KV, stop checks,
    detokenization): each of the next ``len(forced_token_ids)`` steps emits one of them
    in place of the sampled token.
    """

    forced_token_ids: tuple[int, ...] = ()  # emitted next, in order, instead of sampling
    stop: bool = False  # finish the request once the forced tokens are out
    probe_token_ids: tuple[int, ...] = ()  # start a trial branch: tokens so far + these
    probe_max_tokens: int = 0  # trial-answer length; the branch is greedy
    reason: str = ""  # why, for stats and logs ("budget", "early_exit", ...)


@dataclass(frozen=True, slots=True)
class CoTVote:
    """A self-consistency decision taken after a window of samples."""

    stop: bool  # no further samples are needed
    answer: str | None  # the voted answer so far (None: no sample had one)
    num_samples: int  # samples the decision saw
    num_votes: int = 0  # samples that voted for ``answer``
    confidence: float = 0.0  # the rule's own measure (vote share, posterior probability)


class SelfConsistency(BaseModel):
    """Per-request self-consistency: sample ``n`` times in windows, vote, stop early."""

    model_config = _FROZEN

    n: int = Field(16, ge=1, le=128)  # most samples drawn
    method: str = "esc"  # stopping rule: a name in the sagellm.cot group (esc, adaptive, majority)
    window: int = Field(4, ge=1, le=128)  # samples drawn together before each decision
    options: Mapping[str, Any] = Field(default_factory=dict)  # the rule's config fields


# --------------------------------------------------------------------------- communication


class TopologyInfo(BaseModel):
    """Devices and links seen by a topology detector (the seeds' ``TopologyInfo``).

    With accelerators, devices are the accelerators of ``device_type`` in PCI address
    order and a link joins two of them. On a machine without accelerators
    (``device_type`` ``"cpu"``), devices are the online logical CPUs and a link joins
    two NUMA nodes (``shm`` inside one node, ``numa`` between two). Every link carries
    an alpha-beta cost: a message of ``n`` bytes takes ``alpha + n / beta``.
    """

    model_config = _FROZEN

    num_devices: int = Field(ge=0)
    device_type: str = "cpu"  # platform: cpu, cuda, rocm, ascend, cambricon, hygon, kunlun, ...
    numa_nodes: tuple[tuple[int, ...], ...] = ()  # device (or core) ids per NUMA node
    links: tuple[tuple[int, int, str, float], ...] = ()  # (a, b, kind, GB/s): nvlink, pcie, hccs
    nvlink: bool = False  # any direct high-speed device link
    numa_distances: tuple[tuple[int, ...], ...] = ()  # SLIT row per NUMA node (10 = local)
    device_numa: tuple[int, ...] = ()  # NUMA node of each device (-1: the firmware says none)
    link_latency_us: tuple[float, ...] = ()  # alpha of each entry of links, microseconds


class CommConfig(BaseModel):
    """Process group settings (the seeds' ``CommConfig``)."""

    model_config = _FROZEN

    world_size: int = Field(1, ge=1)
    rank: int = Field(0, ge=0)
    backend: str = "gloo"  # torch.distributed backend name

    @model_validator(mode="after")
    def _rank_in_world(self) -> CommConfig:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
        return self


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """KV blocks to send from one instance to another (the seeds' ``TransferPlan``).

    Also what a producer offers of a finished request (vLLM's ``kv_transfer_params``):
    a router hands the plan a producer's ``request_finished`` returned to the consumer.
    Block ``i`` of ``block_ids`` holds the request's tokens ``i * block_size`` onwards.
    """

    source: str  # instance id (or address) holding the blocks
    target: str  # instance id (or address) receiving them ("" while unknown)
    block_ids: tuple[int, ...]  # blocks on the source
    total_bytes: int  # bytes the blocks occupy (every layer, keys and values)
    dst_block_ids: tuple[int, ...] = ()  # places on the target, when already allocated
    request_id: str = ""  # request whose KV the blocks hold ("" for anonymous blocks)
    num_tokens: int = 0  # token positions the blocks hold (0: every position of them)


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class ModelOutput:
    """Logits a runtime returns for one plan.

    Row ``i`` of ``logits`` belongs to ``request_ids[i]``; a chunk carrying ``k`` draft
    tokens contributes ``k + 1`` consecutive rows (one per verified position).
    """

    request_ids: tuple[str, ...]
    logits: Any  # torch.Tensor [rows, vocab], float32


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps (time.monotonic()) of one request."""

    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from a prefix cache
    num_output_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token in seconds."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, in seconds."""
        if self.finished_time is None or self.first_token_time is None:
            return None
        if self.num_output_tokens < 2:
            return 0.0
        return (self.finished_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass(slots=True)
class CompletionOutput:
    """One of the ``n`` continuations of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None  # None while still generating
    stop_reason: str | int | None = None  # the stop string or token that matched
    logprobs: list[dict[int, float]] | None = None  # per token: top-k id -> logprob
    cumulative_logprob: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """The state of a request as an engine returns or streams it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    consistency: CoTVote | None = None  # self-consistency's vote over ``outputs``
