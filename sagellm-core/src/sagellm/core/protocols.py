"""The slots of sageLLM, one ``typing.Protocol`` each.

An implementation is a class registered under the slot's entry-point group (see
:mod:`sagellm.core.registry`). It declares its pydantic config as the class attribute
``config_class`` and is built as ``cls(config, **context)``, where ``context`` carries the
components it collaborates with (for example a scheduler receives ``kv_pool=`` and
``prefix_index=``). Protocols are runtime-checkable so ``isinstance(impl, KVPool)`` is
the first line of every conformance suite; the behaviour is checked by the suites in
:mod:`sagellm.core.testing`.

Conventions: ``num_*`` are counts, ``*_ids`` are id lists, ``can_*`` never change state.
Capacity shortfalls return ``None`` (or an empty result); exceptions are for caller
mistakes and derive from :class:`sagellm.core.errors.SageLLMError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from sagellm.core.types import (
    AllocationResult,
    BlockShape,
    CapabilityDescriptor,
    CoTStep,
    CoTVote,
    DraftRequest,
    EvictionDecision,
    ExecutionPlan,
    FinishReason,
    GenerationRequest,
    KVBlockInfo,
    KVCacheSchema,
    LifetimePrediction,
    MigrationPlan,
    MigrationResult,
    ModelOutput,
    OverlapOp,
    PolicyContext,
    PrefixEntry,
    PrefixMatch,
    QuantizationProfile,
    RequestOutput,
    SamplingParams,
    SchedulerOutput,
    SparsityProfile,
    SpeculativeDraft,
    TopologyInfo,
    TransferPlan,
)

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel

__all__ = [
    "CoTController",
    "CommBackend",
    "EvictionPolicy",
    "IRBuilder",
    "InferenceEngine",
    "KVMigrator",
    "KVPool",
    "KVQuota",
    "KVTransferChannel",
    "LinearMethod",
    "KernelProvider",
    "LifetimePredictor",
    "OverlapScheduler",
    "Platform",
    "PrefixIndex",
    "Proposer",
    "Quantizer",
    "Runtime",
    "Scheduler",
    "Sparsifier",
    "TieredKVStore",
    "TopologyDetector",
]


# ============================================================== direction 2: KV and scheduling


@runtime_checkable
class KVPool(Protocol):
    """A paged pool of KV-cache blocks on one device (group ``sagellm.kv_pool``).

    Anchor: vLLM v1 ``BlockPool`` (free-block queue, ``ref_cnt`` per block) and the block
    half of its ``KVCacheManager``. Differences: the pool owns the per-layer storage
    tensors, laid out from a :class:`KVCacheSchema`, so a runtime reads and writes KV
    through :meth:`layer_cache`; prefix caching is not inside the pool but in a separate
    :class:`PrefixIndex` that holds references like any other user.

    Context at construction: ``schema=`` (KVCacheSchema), ``device=`` (torch device string).
    """

    config_class: ClassVar[type[BaseModel]]

    @property
    def schema(self) -> KVCacheSchema:
        """Layout of every block."""
        ...

    @property
    def num_blocks(self) -> int:
        """Capacity in blocks (fixed at construction)."""
        ...

    @property
    def num_free_blocks(self) -> int:
        """Blocks with reference count 0."""
        ...

    def can_allocate(self, num_blocks: int) -> bool:
        """True when :meth:`allocate` of ``num_blocks`` would succeed now; no side effect."""
        ...

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Hand out ``num_blocks`` distinct free blocks, each with reference count 1.

        Returns ``None`` (and changes nothing) when fewer are free: the caller preempts or
        evicts. O(num_blocks). Raises ``ValueError`` for a negative count.
        """
        ...

    def share(self, block_ids: Sequence[int]) -> None:
        """Add one reference to each block, e.g. a prefix hit.

        Every block must be allocated: sharing a free block raises ``ValueError``.
        """
        ...

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; a block at 0 returns to the free list.

        Freeing a block that is already free is a caller bug and raises ``ValueError``
        naming the block, without changing any block.
        """
        ...

    def ref_count(self, block_id: int) -> int:
        """Current reference count of ``block_id`` (0 when free)."""
        ...

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy the KV content of ``src`` into ``dst`` for every ``(src, dst)`` pair."""
        ...

    def layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value storage of one layer, each ``[num_blocks, block_size, heads, dim]``."""
        ...

    def block_info(self, block_id: int) -> KVBlockInfo:
        """What the pool knows about one block."""
        ...

    def make_stats(self) -> Any:
        """A :class:`~sagellm.core.telemetry.KVPoolStats` snapshot; resets counters."""
        ...


@runtime_checkable
class TieredKVStore(Protocol):
    """A hierarchy of KV tiers, fastest first (``device``, ``host``, ``disk``).

    Anchor: the seeds' ``HierarchyManager`` and LMCache/Mooncake-style offloading.
    Blocks are addressed per tier; a block demoted from the device tier gets an id in the
    lower tier and keeps its content. Part of group ``sagellm.kv_pool`` implementations.
    """

    @property
    def tiers(self) -> tuple[str, ...]:
        """Tier names, fastest first."""
        ...

    def allocate(self, tier: str, num_blocks: int, tenant: str = "") -> AllocationResult | None:
        """Blocks in ``tier`` charged to ``tenant``; ``None`` when full or over quota."""
        ...

    def free(self, tier: str, block_ids: Sequence[int]) -> None:
        """Release blocks of ``tier``."""
        ...

    def block_info(self, tier: str, block_id: int) -> KVBlockInfo:
        """What the tier knows about one block."""
        ...

    def make_stats(self) -> Any:
        """A list of :class:`~sagellm.core.telemetry.TierStats`, one per tier."""
        ...


@runtime_checkable
class KVMigrator(Protocol):
    """Executes :class:`MigrationPlan` objects between tiers (the seeds' ``KVMigrator``)."""

    def plan(self, src_tier: str, dst_tier: str, block_ids: Sequence[int]) -> MigrationPlan | None:
        """Allocate destinations for ``block_ids``; ``None`` when the destination is full."""
        ...

    def migrate(self, plan: MigrationPlan) -> MigrationResult:
        """Copy the blocks, release the sources unless ``keep_source``; report bandwidth."""
        ...


@runtime_checkable
class KVQuota(Protocol):
    """Per-tenant block quotas (the seeds' ``QuotaManager``)."""

    def can_charge(self, tenant: str, num_blocks: int) -> bool:
        """True when ``tenant`` may take ``num_blocks`` more; no side effect."""
        ...

    def charge(self, tenant: str, num_blocks: int) -> bool:
        """Account blocks to ``tenant``; False (and a counted violation) when over quota."""
        ...

    def release(self, tenant: str, num_blocks: int) -> None:
        """Return blocks charged to ``tenant``."""
        ...

    def usage(self) -> Mapping[str, int]:
        """Blocks charged per tenant."""
        ...


@runtime_checkable
class PrefixIndex(Protocol):
    """An index from token prefixes to KV blocks (group ``sagellm.prefix_cache``).

    Anchors: SGLang ``RadixCache`` (``match_prefix``, ``insert``, ``inc_lock_ref``,
    ``evict``) and vLLM's automatic prefix caching (hash-chained full blocks). Differences:
    the index never touches the pool; it only records which blocks hold which tokens and
    reports blocks it stops referencing, so the caller moves the pool's reference counts.
    Only full blocks are indexed. Entries are separated by an isolation key (tenant and
    cache salt): a lookup never matches another key's prefixes.

    Context at construction: ``block_size=`` and optionally ``eviction_policy=``.
    """

    config_class: ClassVar[type[BaseModel]]

    @property
    def block_size(self) -> int:
        """Tokens per block; matches are multiples of it."""
        ...

    @property
    def num_cached_blocks(self) -> int:
        """Blocks the index references."""
        ...

    def match(self, token_ids: Sequence[int], isolation_key: str = "") -> PrefixMatch:
        """Longest cached prefix of ``token_ids`` made of full blocks.

        Never reports more tokens than given. Counts as an access for eviction order.
        Does not lock: call :meth:`lock` before relying on the blocks.
        """
        ...

    def insert(
        self, token_ids: Sequence[int], block_ids: Sequence[int], isolation_key: str = ""
    ) -> list[int]:
        """Record that ``block_ids`` hold the full blocks of ``token_ids``.

        Returns the block ids the index newly references (the caller adds a pool
        reference for each). Blocks for prefixes already cached are not taken: the
        cached ids stay, and the caller keeps sole ownership of its duplicates.
        """
        ...

    def lock(self, match: PrefixMatch) -> None:
        """Protect the matched blocks from eviction until :meth:`unlock`."""
        ...

    def unlock(self, match: PrefixMatch) -> None:
        """Undo one :meth:`lock` of the same match."""
        ...

    def evict(self, num_blocks: int) -> list[int]:
        """Drop up to ``num_blocks`` unlocked blocks, leaves first; return their ids.

        Fewer only when fewer unlocked blocks are cached. A block is dropped only after
        every block that extends its prefix, so the cached prefixes stay whole. The caller
        releases the index's pool reference of every returned block.
        """
        ...

    def entries(self) -> Iterable[PrefixEntry]:
        """Every cached entry (for inspection and tests)."""
        ...

    def clear(self) -> list[int]:
        """Drop every unlocked entry; return the released block ids."""
        ...

    def make_stats(self) -> Any:
        """A :class:`~sagellm.core.telemetry.PrefixCacheStats` snapshot; resets counters."""
        ...


@runtime_checkable
class EvictionPolicy(Protocol):
    """Chooses which cached keys to drop (group ``sagellm.eviction``).

    Anchor: libCacheSim's cache interface (``get`` = find + insert on miss, ``evict``,
    ``remove``); keys are hashable (block ids, prefix node ids). Difference: the policy
    only orders keys and keeps its ghost history; the owner (a prefix index, a tier)
    stores the data and asks for victims. ``capacity`` is the owner's size in keys, which
    adaptive policies (ARC, S3-FIFO) need. Pinned keys are never victims.
    """

    config_class: ClassVar[type[BaseModel]]

    def insert(
        self,
        key: Hashable,
        *,
        cost: float = 1.0,
        now: float | None = None,
        features: Mapping[str, float] | None = None,
    ) -> None:
        """A new key entered the cache.

        ``cost``: what recomputing the entry costs (seconds, or blocks as a proxy);
        ``now``: the access time (``None``: the policy's own clock, ``time.monotonic()``);
        ``features``: what the owner knows of the entry, named as for
        :class:`LifetimePredictor` (``prefix_depth``, ``request_kind``, ``tenant_hash``),
        plus ``num_blocks``, the entry's size in blocks when it holds several; policies
        that do not use them ignore them.
        """
        ...

    def access(
        self,
        key: Hashable,
        *,
        now: float | None = None,
        features: Mapping[str, float] | None = None,
    ) -> None:
        """A held key was used (a hit); ``now`` and ``features`` as for :meth:`insert`."""
        ...

    def remove(self, key: Hashable) -> None:
        """The owner dropped ``key`` by itself (not through :meth:`evict`)."""
        ...

    def pin(self, key: Hashable) -> None:
        """Exclude a held key from eviction; pins nest."""
        ...

    def unpin(self, key: Hashable) -> None:
        """Undo one :meth:`pin`."""
        ...

    def evict(self, num: int, context: PolicyContext | None = None) -> EvictionDecision:
        """Remove and return up to ``num`` held, unpinned keys, best victim first.

        Fewer than ``num`` only when fewer unpinned keys are held: the owner asks because
        it needs the room. Returned keys are no longer contained.
        """
        ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...

    def make_stats(self) -> Any:
        """An :class:`~sagellm.core.telemetry.EvictionStats` snapshot; resets counters."""
        ...


@runtime_checkable
class LifetimePredictor(Protocol):
    """Predicts when a KV block or prefix is used again (group ``sagellm.lifetime``).

    Anchor: learned cache-replacement work (LRB, "learning relaxed Belady") reduced to
    online features the engine has. Features are a flat mapping of numbers: prefix depth,
    access count, seconds since last access, request kind, tenant hash.
    """

    config_class: ClassVar[type[BaseModel]]

    def observe(self, key: Hashable, features: Mapping[str, float], now: float) -> None:
        """Record an access of ``key`` at ``now``; learns from the gap to its previous one."""
        ...

    def predict(self, features: Mapping[str, float]) -> LifetimePrediction:
        """Predicted reuse of an entry with ``features``. Must be cheap (microseconds)."""
        ...

    def make_stats(self) -> Any:
        """A :class:`~sagellm.core.telemetry.LifetimeStats` snapshot; resets counters."""
        ...


@runtime_checkable
class Scheduler(Protocol):
    """Decides which tokens of which requests are computed each step (group ``sagellm.scheduler``).

    Anchor: vLLM v1 ``SchedulerInterface`` (``add_request``, ``schedule``,
    ``update_from_output``, ``finish_requests``) and its rule: every request's
    ``num_computed_tokens`` catches up with its token count under a per-step token budget;
    chunked prefill, prefix hits and speculative tokens are the same mechanism.
    Differences: the output is lowered to an :class:`ExecutionPlan` IR by
    :meth:`build_plan`; stop conditions that need text (stop strings) are decided by the
    engine, which calls :meth:`finish_requests`.

    Context at construction: ``kv_pool=`` (KVPool), ``max_model_len=`` (int), optionally
    ``prefix_index=`` (PrefixIndex) and ``tiered_store=`` (TieredKVStore). A request with
    ``skip_prefix_cache`` set is neither matched against the prefix index nor inserted
    into it.
    """

    config_class: ClassVar[type[BaseModel]]

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request.

        Raises InvalidRequestError when it can never run: a prompt longer than
        ``max_model_len`` or needing more blocks than the whole pool holds.
        """
        ...

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work, allocating blocks (and preempting) as needed."""
        ...

    def build_plan(self, output: SchedulerOutput) -> ExecutionPlan:
        """Lower a scheduler output to the IR the runtime executes."""
        ...

    def update_from_output(
        self, output: SchedulerOutput, sampled_token_ids: Mapping[str, Sequence[int]]
    ) -> None:
        """Advance computed tokens of every scheduled chunk and append the sampled tokens.

        ``sampled_token_ids`` holds, for every chunk with ``sample`` set, the accepted
        tokens (one, or more after speculative verification).
        """
        ...

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> None:
        """End requests (stop, length, abort) and release their blocks; unknown ids are ignored."""
        ...

    def has_unfinished_requests(self) -> bool:
        """True while any request is waiting or running."""
        ...

    @property
    def num_waiting(self) -> int:
        """Requests queued."""
        ...

    @property
    def num_running(self) -> int:
        """Requests holding blocks."""
        ...

    def make_stats(self) -> Any:
        """A :class:`~sagellm.core.telemetry.SchedulerStats` snapshot; resets counters."""
        ...


@runtime_checkable
class IRBuilder(Protocol):
    """Lowers scheduler decisions to an :class:`ExecutionPlan` (the seeds' ``IRBuilder``).

    Anchor: none in the peers (vLLM hands ``SchedulerOutput`` straight to the model
    runner); the IR makes prefill/decode separation, migrations and transfers explicit so
    a later pass can place them on different instances.
    """

    def build(self, output: SchedulerOutput) -> ExecutionPlan:
        """Nodes for migrations, prefill chunks, the decode batch and sampling, optimised."""
        ...


# ============================================================== runtime, platform, engine


@runtime_checkable
class Runtime(Protocol):
    """Executes plans on a model (group ``sagellm.runtime``).

    Anchor: vLLM ``GPUModelRunner.execute_model`` and nano-vllm ``ModelRunner``.
    Difference: the runtime reads KV through a bound :class:`KVPool` and returns logits;
    sampling is the engine's.
    """

    config_class: ClassVar[type[BaseModel]]

    def capabilities(self) -> CapabilityDescriptor:
        """Devices, dtypes and the longest sequence the loaded model supports."""
        ...

    def kv_cache_schema(self, block_size: int, dtype: str | None = None) -> KVCacheSchema:
        """The KV layout this model needs at ``block_size`` tokens per block."""
        ...

    def bind_kv_pool(self, pool: KVPool) -> None:
        """Use ``pool``'s storage for attention; raises CapabilityMismatchError if its schema differs."""
        ...

    def execute(self, plan: ExecutionPlan) -> ModelOutput:
        """Run the plan's compute nodes (prefill chunks, decode batch) in one forward pass.

        Returns fp32 logits with one row per sampled chunk of ``plan.compute_chunks``, in
        that order (``k + 1`` rows for a chunk carrying ``k`` draft tokens). The runtime
        executes compute nodes only: ``KV_MIGRATE`` and ``KV_TRANSFER`` nodes are executed
        by the engine before it calls this method, so their blocks are in place.
        """
        ...


@runtime_checkable
class Platform(Protocol):
    """A device family (group ``sagellm.platform``; cpu, cuda and rocm are built in).

    Anchor: vLLM ``vllm/platforms`` (``Platform``, ``device_type``, ``dist_backend``).
    """

    name: str  # "cpu", "cuda", "rocm", "ascend", ...
    device_type: str  # torch device type: "cpu", "cuda", "npu", "mlu", ...
    dist_backend: str  # torch.distributed backend: gloo, nccl, hccl, cncl, bkcl
    visible_devices_env: str  # e.g. CUDA_VISIBLE_DEVICES, ASCEND_RT_VISIBLE_DEVICES

    def is_available(self) -> bool:
        """True when the device and its torch extension are present."""
        ...

    def device_count(self) -> int:
        """Devices visible to this process (0 when the platform is not available)."""
        ...

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        """``(free_bytes, total_bytes)`` of one device.

        Raises PlatformUnavailableError when the platform is not available here, and
        ``ValueError`` for an index outside ``0 .. device_count() - 1``.
        """
        ...

    def supported_dtypes(self) -> tuple[str, ...]:
        """Element types the device computes in."""
        ...


@runtime_checkable
class InferenceEngine(Protocol):
    """A serving engine (the seeds' ``BaseInferenceEngine``).

    Anchor: vLLM ``AsyncLLM`` (``generate`` yielding outputs, ``abort``) and its control
    plane view. A control plane routes between engines by :meth:`capabilities`.
    """

    def capabilities(self) -> CapabilityDescriptor:
        """What the engine serves (model, devices, dtypes, features)."""
        ...

    def generate(
        self, prompt: str | Sequence[int], sampling: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's state after every step until it finishes."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its resources; unknown ids are ignored."""
        ...

    def is_healthy(self) -> bool:
        """True while the engine loop runs."""
        ...


# ============================================================== direction 1: communication


@runtime_checkable
class TopologyDetector(Protocol):
    """Discovers devices, NUMA layout and links (group ``sagellm.topology``).

    Anchor: ``nvidia-smi topo -m`` / NCCL topology detection; torch device queries.
    """

    def detect(self) -> TopologyInfo:
        """Inspect the machine; called once when a launcher places ranks.

        Returns the devices, their NUMA nodes and one entry per link with its alpha-beta
        cost. Deterministic: the same machine (or the same sysfs tree) gives an equal
        result. Files the kernel does not provide are reported as unknown (``-1``, no
        link), never guessed; a root that is not a sysfs tree at all raises
        ``ValueError`` naming the path.
        """
        ...


@runtime_checkable
class CommBackend(Protocol):
    """Collective and point-to-point operations (group ``sagellm.comm_backend``).

    Anchor: ``torch.distributed`` (same names and semantics, in place on tensors).
    Every rank calls each collective in the same order with tensors of the same shape and
    dtype. Context at construction: ``rank=``, ``world_size=`` and how to rendezvous
    (``init_method=``, e.g. ``"tcp://host:port"`` or ``"file:///path"``).
    """

    @property
    def rank(self) -> int:
        """This process's rank, ``0 <= rank < world_size``."""
        ...

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        ...

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce ``tensor`` in place across ranks; every rank gets the same values.

        ``op`` is ``"sum"``, ``"max"``, ``"min"`` or ``"product"``; another name raises
        ``ValueError`` listing these.
        """
        ...

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor) -> None:
        """Concatenate every rank's ``tensor`` into ``output`` along dim 0 (rank order).

        ``output`` must hold ``world_size`` times ``tensor``'s elements, same dtype;
        otherwise ``ValueError`` says which shape was expected.
        """
        ...

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send ``tensor`` to rank ``dst`` (blocks until the peer may reuse it)."""
        ...

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        """Receive into ``tensor`` what rank ``src`` sends."""
        ...

    def barrier(self) -> None:
        """Return once every rank has entered the barrier."""
        ...

    def close(self) -> None:
        """Release what the backend holds (process group, shared memory); idempotent.

        After ``close`` no collective may be called.
        """
        ...


@runtime_checkable
class KVTransferChannel(Protocol):
    """Moves KV blocks between instances (group ``sagellm.kv_transfer``).

    Anchor: vLLM's v1 KV connector (``KVConnectorBase_V1``), split the same way into a
    scheduler side (what a remote instance holds, what to keep when a request finishes)
    and a worker side (start loads, wait for them per layer or whole, send); Mooncake and
    NIXL as transports. Differences: one object plays both sides (an engine process
    holds scheduler and pool together), plans are plain :class:`TransferPlan` data
    instead of per-step connector metadata, and the consumer pulls whole plans whose
    layers arrive in order, so :meth:`wait_for_layer` is the layer-pipelining hook.

    Roles: a *producer* instance (prefill) keeps a finished request's blocks and serves
    them; a *consumer* instance (decode) learns of them with :meth:`add_remote_request`,
    counts them in :meth:`get_num_matched_tokens`, allocates local blocks and loads.
    A producer keeps offered blocks until the consumer acknowledges them (the end of a
    successful load) or a lease expires (the consumer is gone), then frees them: no
    block leaks either way.

    Context at construction: ``pool=`` (the local :class:`KVPool`, or later through
    :meth:`register_pool`); where the peer is comes from the implementation's config.
    """

    # ------------------------------------------------------------------ scheduler side

    def add_remote_request(self, plan: TransferPlan) -> None:
        """Consumer: a producer holds ``plan.num_tokens`` tokens of ``plan.request_id``.

        Called when a request arrives with the plan a producer's :meth:`request_finished`
        returned (a router forwards it). Raises ``ValueError`` for a plan without a
        request id or whose token count does not fit its blocks.
        """
        ...

    def get_num_matched_tokens(self, request_id: str, num_computed_tokens: int) -> int | None:
        """Consumer: tokens past ``num_computed_tokens`` that a remote instance can provide.

        Called by the scheduler before it allocates blocks for a waiting request. ``0``
        when no remote holds more (or the request is unknown); ``None`` when the answer
        is not known yet (ask again next step). No side effect.
        """
        ...

    def update_state_after_alloc(
        self, request_id: str, block_ids: Sequence[int], num_external_tokens: int
    ) -> TransferPlan | None:
        """Consumer: local blocks ``block_ids`` were allocated for the remote tokens.

        ``num_external_tokens`` is what :meth:`get_num_matched_tokens` returned (or less);
        ``block_ids`` are the local blocks that will hold them, one per remote block.
        Returns the load plan (``dst_block_ids`` set) for :meth:`start_load`, or ``None``
        when ``num_external_tokens`` is 0. Raises ``ValueError`` when the block count
        does not match the tokens or the request is unknown.
        """
        ...

    def request_finished(
        self, request_id: str, block_ids: Sequence[int], num_tokens: int | None = None
    ) -> tuple[bool, TransferPlan | None]:
        """Producer: ``request_id`` finished holding ``block_ids`` (its tokens in order).

        ``num_tokens``: positions the blocks hold (``None``: every position, i.e.
        ``len(block_ids) * block_size``); a consumer can load only whole blocks of them.

        Returns ``(keep, plan)``. ``keep`` True: the channel now owns the caller's
        reference to each block (the caller must not free them) and frees them itself,
        in the caller's thread during :meth:`get_finished` (called every step) or
        :meth:`close`, once the consumer acknowledged the transfer or the lease expired;
        ``plan`` is
        what a consumer needs (hand it to the consumer's :meth:`add_remote_request`).
        ``keep`` False (e.g. a consumer-only channel): the caller frees as usual and
        ``plan`` is ``None``.
        """
        ...

    def get_finished(self) -> tuple[frozenset[str], frozenset[str]]:
        """``(sending_done, receiving_done)`` request ids since the last call.

        ``sending_done``: producer-side requests whose blocks the channel released
        (acknowledged or lease expired); ``receiving_done``: consumer-side loads complete
        (successfully or not: :meth:`wait` raises for a failed one).
        """
        ...

    # ------------------------------------------------------------------ worker side

    def register_pool(self, pool: KVPool) -> None:
        """Use ``pool`` as the local block storage (vLLM's ``register_kv_caches``).

        Called once before the first transfer when the pool was not given at
        construction; its schema must match the peer's (checked at the first transfer).
        """
        ...

    def start_load(self, plan: TransferPlan) -> None:
        """Consumer: begin loading ``plan`` (from :meth:`update_state_after_alloc`).

        Returns at once; the blocks arrive at ``plan.dst_block_ids`` layer by layer.
        """
        ...

    def wait_for_layer(self, plan: TransferPlan, layer: int) -> None:
        """Consumer: block until layer ``layer`` of a started plan is in the pool.

        Lets attention of layer ``layer`` run while later layers are still in flight.
        Raises the transfer's error (a :class:`~sagellm.core.errors.SageLLMError`) if it
        failed, ``TimeoutError`` past the channel's timeout.
        """
        ...

    def send(self, plan: TransferPlan, pool: KVPool) -> None:
        """Producer: offer the plan's blocks in ``pool`` to ``plan.target``.

        Returns at once; the blocks are read when the target receives the plan, and the
        caller keeps its references until :meth:`wait` returns.
        """
        ...

    def receive(self, plan: TransferPlan, pool: KVPool) -> None:
        """Consumer: receive the plan's blocks into ``pool`` at ``plan.dst_block_ids``.

        Returns at once (like :meth:`start_load`); :meth:`wait` blocks until done.
        """
        ...

    def wait(self, plan: TransferPlan) -> float:
        """Block until the plan is complete on this side; seconds it took.

        Raises the transfer's error if it failed (the message names the peer and what
        to check), ``TimeoutError`` past the channel's timeout.
        """
        ...

    def close(self) -> None:
        """Stop background work and release the transport; idempotent.

        Blocks the channel still owns are freed first.
        """
        ...


@runtime_checkable
class OverlapScheduler(Protocol):
    """Overlaps communication with computation (group ``sagellm.overlap``).

    Anchor: SGLang's two-batch overlap and vLLM's dual-batch overlap (a step's batch is
    cut into micro-batches; one micro-batch's collective runs while another computes),
    and DeepSpeed/Megatron's overlap of asynchronous collectives with compute. A worker
    calls :meth:`split` on each step's plan, runs each micro-batch's layers through
    :meth:`run` with its own compute and collective functions, and joins the results.
    """

    def split(self, plan: ExecutionPlan, num_micro_batches: int) -> list[ExecutionPlan]:
        """Cut ``plan`` into ``num_micro_batches`` plans, in order, for one step.

        Together the micro-batches hold exactly the plan's compute tokens: each
        sequence chunk appears whole in one micro-batch, or (prefill chunks, where the
        implementation allows) as consecutive pieces in consecutive micro-batches, with
        only the last piece sampling. Chunk order is kept, prefill chunks stay in
        prefill nodes and decode chunks in decode nodes, and the micro-batches are
        balanced by the implementation's cost estimate. KV migrations go with the first
        micro-batch (they run before the forward pass), KV transfers with the last.
        ``num_micro_batches == 1`` returns ``[plan]``. Raises ValueError when
        ``num_micro_batches < 1`` or when the plan cannot be cut into that many
        non-empty micro-batches (the message says the most it allows).
        """
        ...

    def schedule(self, num_micro_batches: int, num_layers: int) -> tuple[OverlapOp, ...]:
        """The order :meth:`run` executes, as plain data (no side effects).

        For every layer and micro-batch there is one COMPUTE, then one COMMUNICATE, then
        one WAIT op, and a micro-batch's WAIT at layer ``l`` comes before its COMPUTE at
        layer ``l + 1``. The COMPUTE ops between a COMMUNICATE and its WAIT are the ones
        that collective can hide under. Raises ValueError when either count is below 1.
        """
        ...

    def run(
        self,
        states: Sequence[Any],
        num_layers: int,
        compute: Callable[[int, int, Any], Any],
        communicate: Callable[[int, int, Any], Callable[[], Any]],
    ) -> list[Any]:
        """Run ``num_layers`` layers over the micro-batches' ``states`` in schedule order.

        ``compute(layer, micro_batch, state)`` returns the state the collective works
        on; ``communicate(layer, micro_batch, state)`` starts the collective and returns
        a waiter, a function that blocks until it is done and returns the state the next
        layer's compute receives. Every waiter is called exactly once, before its
        result is used. Returns the final state of each micro-batch, in order. An error
        raised by ``compute`` or a waiter propagates after the collectives already
        started have been waited (so none is left running). Raises ValueError when
        ``states`` is empty or ``num_layers < 1``.
        """
        ...


# ============================================================== direction 3: acceleration


@runtime_checkable
class LinearMethod(Protocol):
    """How one projection holds its weight and multiplies by it.

    Anchor: vLLM's ``LinearMethodBase`` (``create_weights`` /
    ``process_weights_after_loading`` / ``apply``). The layer owns the shapes and the
    sharding; the method owns the bytes and the kernel, so quantization, fused kernels and
    tensor-parallel slices compose on one layer class. The layer (the engine's ``Linear``)
    exposes ``input_size``, ``output_size``, ``weight`` (float ``[output_size,
    input_size]`` in the compute dtype once loaded), ``bias`` (or None) and ``packed`` (a
    :class:`~sagellm.core.types.PackedWeight` when the checkpoint stored the weight
    quantized, else None).
    """

    name: str  # short name for logs and stats: "dense", "int4", "gguf_q4_1", ...

    def process_weights(self, layer: torch.nn.Module) -> None:
        """Called once after the checkpoint is loaded, before the first :meth:`apply`.

        Turns the layer's float ``weight`` (or its ``packed`` blocks, where the method
        computes on that format) into the method's own tensors, registered on ``layer``;
        it may drop ``weight`` when it no longer needs it. Raises ValueError when the
        layer's shape does not suit the method (the message says which shapes do).
        """
        ...

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T (+ bias)`` for ``x`` ``[M, input_size]``; returns ``[M, output_size]``
        in ``x``'s dtype. Must not change ``x``."""
        ...


@runtime_checkable
class Quantizer(Protocol):
    """Chooses and prepares the linear methods of a model (group ``sagellm.quantization``).

    Anchors: vLLM's ``QuantizationConfig.get_quant_method(layer, prefix)`` and gpt-fast's
    two steps (make the quantized weights, convert the model for run time). The runtime
    calls :meth:`prepare` once with the model's projections, then :meth:`linear_method`
    for each of them, then the method's ``process_weights``.
    """

    config_class: ClassVar[type[BaseModel]]

    def profile(self) -> QuantizationProfile:
        """What this quantizer produces."""
        ...

    def prepare(
        self,
        layers: Mapping[str, torch.nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        """Called once, after loading and before :meth:`linear_method`.

        ``layers`` maps each projection's name (``"layers.3.qkv_proj"``, ``"lm_head"``)
        to its layer; ``run(token_ids)`` runs the float model forward over one sequence.
        Calibrating quantizers (GPTQ, AWQ, SmoothQuant) hook the layers and call ``run``
        over their calibration text; the others do nothing. Raises ValueError when a
        calibrating quantizer is given no ``run``.
        """
        ...

    def linear_method(self, name: str, layer: torch.nn.Module) -> LinearMethod | None:
        """The method for projection ``name``; None keeps the layer's float method."""
        ...


@runtime_checkable
class Sparsifier(Protocol):
    """Removes unimportant weights, channels or heads of a model (group ``sagellm.sparsity``).

    Anchors: Wanda (Sun et al. 2023) and SparseGPT (Frantar and Alistarh 2023) for
    unstructured and N:M masks, FLAP and SliceGPT for structured pruning that shrinks the
    dense matrices. The runtime calls, once after loading and before quantization (so a
    pruned model can then be quantized): :meth:`prepare` with the model's projections,
    :meth:`apply`, which prunes them in place and returns the new shapes of the blocks
    it shrank (the model resizes those blocks' attention), then :meth:`linear_method`
    for each projection that no quantizer takes. Projections are named and shaped as for
    :class:`Quantizer` (``"layers.3.qkv_proj"`` stacks q, k, v in ``output_sizes``;
    ``"layers.3.gate_up_proj"`` stacks gate and up). Context given to the constructor:
    ``tokenize=`` (str -> token ids, for calibration on shipped text) and ``head_dim=``
    (for head pruning).
    """

    config_class: ClassVar[type[BaseModel]]

    def profile(self) -> SparsityProfile:
        """What this sparsifier produces."""
        ...

    def prepare(
        self,
        layers: Mapping[str, torch.nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        """Called once, after loading and before :meth:`apply`.

        ``run(token_ids)`` runs the dense model forward over one sequence. Calibrating
        sparsifiers (Wanda, SparseGPT, structured) hook the layers and call ``run`` over
        their calibration text; magnitude pruning does nothing. Raises ValueError when a
        calibrating sparsifier is given no ``run``.
        """
        ...

    def apply(self, layers: Mapping[str, torch.nn.Module]) -> dict[int, BlockShape]:
        """Prune ``layers`` in place; the new shape of each block whose shape changed.

        Masking sparsifiers zero weights and return ``{}``. Structured ones replace the
        layers' ``weight`` (and ``bias``, ``input_size``, ``output_size``,
        ``output_sizes``) with smaller ones and return ``{block index: BlockShape}``.
        Every layer it changes has its ``packed`` checkpoint blocks set to None (they no
        longer hold its weight). Raises ValueError when a layer's shape does not suit
        the pattern (the message says which shapes do).
        """
        ...

    def linear_method(self, name: str, layer: torch.nn.Module) -> LinearMethod | None:
        """A method that computes on the pruned weight (torch's 2:4 semi-structured
        kernels on CUDA) for projection ``name``; None keeps the layer's float method."""
        ...


@runtime_checkable
class Proposer(Protocol):
    """Proposes draft tokens for speculative decoding (group ``sagellm.speculative``).

    Anchor: vLLM v1 ``NgramProposer``/``EagleProposer`` (one ``propose`` per step over the
    running requests) and gpt-fast's ``speculative_decode``. Differences: a proposer sees
    each request's prompt and output apart (suffix trees treat them differently), is told
    when a request finishes (so it can learn from finished outputs and drop per-request
    state), and the engine verifies its drafts; a proposer never touches the KV pool.

    Context at construction: optionally ``runtime=`` (the target's Runtime) for proposers
    that run a model through the engine's runtime; others ignore it. A proposer class
    with ``needs_hidden_states = True`` gets each request's last hidden state in
    :attr:`DraftRequest.hidden_state` (heads that draft from the target's features).
    """

    config_class: ClassVar[type[BaseModel]]

    @property
    def num_speculative_tokens(self) -> int:
        """Most draft tokens it proposes for one request per step (k)."""
        ...

    def propose(self, requests: Sequence[DraftRequest]) -> list[SpeculativeDraft]:
        """One draft per request, in the order given, called before each step is scheduled.

        A draft has at most ``min(request.num_tokens, num_speculative_tokens)`` tokens and
        may be empty (nothing worth proposing). Raises nothing for any token sequence.
        """
        ...

    def observe_finished(
        self, request_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int]
    ) -> None:
        """Called once when a request finishes or is aborted; per-request state is dropped
        and learning proposers keep the output for later requests. Unknown ids are fine."""
        ...


@runtime_checkable
class KernelProvider(Protocol):
    """Supplies fused or device-specific kernels (group ``sagellm.kernels``)."""

    def available_ops(self) -> tuple[str, ...]:
        """Names of the ops it implements: "rms_norm", "rotary", "paged_attention", ..."""
        ...

    def get(self, op: str) -> Any:
        """The callable for ``op``; KeyError when not provided."""
        ...


@runtime_checkable
class CoTController(Protocol):
    """Steers chain-of-thought generation (group ``sagellm.cot``).

    Two hooks, one per granularity. Token level (thinking budgets, DEER's early exit): the
    engine calls :meth:`start` when a request (each of its ``n`` samples) enters, then
    :meth:`step` after every step that appended a token, and :meth:`finish` when it
    ends. Sample level (self-consistency: ESC, Adaptive-Consistency): the engine draws a
    request's samples in windows and calls :meth:`vote` after each window. A controller
    that only works at one level answers the other with the neutral value (``None``; a
    plain majority vote that stops when every planned sample is in).
    Anchors: vLLM's ``thinking_token_budget`` (v1 ``thinking_budget_state``), DEER
    (arXiv 2504.15895), ESC (ICLR'24), Adaptive-Consistency (EMNLP'23).
    """

    config_class: ClassVar[type[BaseModel]]

    def start(self, request_id: str, prompt_token_ids: Sequence[int]) -> CoTStep | None:
        """Called once per request (sample) before its first token.

        May already force tokens (a budget of 0 inside a prompt that opens the reasoning).
        A controller that keeps per-request state raises ValueError when ``request_id``
        is already started.
        """
        ...

    def step(self, request_id: str, token_ids: Sequence[int]) -> CoTStep | None:
        """Called after each step that appended a token to a started request.

        ``token_ids`` are every token generated so far, forced ones included. Not called
        while tokens an earlier :class:`CoTStep` forced are still pending. Returns
        ``None`` to let sampling go on, or a step that forces tokens, stops the request
        or starts a trial branch (``probe_token_ids``); forced tokens and ``stop`` take
        precedence over a trial. A controller that keeps per-request state raises
        KeyError for a request that was not started.
        """
        ...

    def observe_probe(
        self, request_id: str, token_ids: Sequence[int], logprobs: Sequence[float]
    ) -> CoTStep | None:
        """Called when a trial branch this controller asked for has finished.

        ``token_ids`` is the branch's greedy continuation after ``probe_token_ids`` and
        ``logprobs`` the log-probability of each of those tokens. Returns as :meth:`step`.
        An unknown or finished request returns ``None``.
        """
        ...

    def finish(self, request_id: str) -> None:
        """Drop the request's state; an unknown id is ignored."""
        ...

    def extract_answer(self, text: str) -> str | None:
        """The answer a finished sample's ``text`` votes for (``None``: it has none)."""
        ...

    def vote(self, answers: Sequence[str | None], num_planned: int) -> CoTVote:
        """Called after each window of samples with the answers of all samples so far.

        ``answers[i]`` is the answer extracted from sample ``i`` (``None``: it had none);
        ``num_planned`` is the most samples the request may draw. Must stop once
        ``len(answers) >= num_planned``. Raises ValueError when ``num_planned < 1``.
        """
        ...
