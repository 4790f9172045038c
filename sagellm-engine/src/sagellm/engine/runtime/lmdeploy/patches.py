"""Run-time patches on the installed lmdeploy, each guarded by release series and target.

Anchor: OpenTelemetry's ``wrapt``-based instrumentors (``instrument`` / ``uninstrument``
wrap named attributes and put the originals back). Differences: a patch names its target
as ``module:Qualified.name`` and the release series it was written for; a target that is
missing (it moved) is an error, not a silent skip; :meth:`LMDeployPatcher.unpatch` puts
back the very objects it took (``Scheduler.__dict__['schedule_running'] is original``).
Class attributes are patched, never module names: lmdeploy's engine imports the classes
before any patch runs.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sagellm.core.errors import ConfigError
from sagellm.engine.runtime.lmdeploy.hooks import (
    CommEvent,
    EvictionEvent,
    LMDeployHooks,
    PrefixMatchEvent,
    PrefixStoreEvent,
    view_of,
)
from sagellm.engine.runtime.lmdeploy.versions import check_version, installed_version

__all__ = [
    "PATCHES",
    "LMDeployPatcher",
    "PatchSpec",
    "PatchStatus",
    "PatchTargetMissingError",
    "patch_statuses",
]

Factory = Callable[[Any, LMDeployHooks, dict[str, Any]], Callable[..., Any]]


class PatchTargetMissingError(ConfigError):
    """A patch's target is not where the patch expects it in the installed lmdeploy."""


@dataclass(frozen=True, slots=True)
class PatchSpec:
    """One patch: what it wraps, for which release series, and the wrapper it builds."""

    name: str
    target: str  # "module:Qualified.name"
    series: tuple[str, ...]
    factory: Factory
    requires: tuple[str, ...] = ()  # further attributes the wrapper uses on the owner
    rebind_importers: bool = False  # also replace the name where lmdeploy modules copied it


@dataclass(frozen=True, slots=True)
class PatchStatus:
    """Whether one patch applies to the installed lmdeploy, and why not."""

    name: str
    target: str
    series: tuple[str, ...]
    applies: bool
    reason: str  # "" when it applies


def _resolve(target: str) -> tuple[Any, str, Any]:
    """(owner, attribute, original) for ``module:Qual.name``; raises LookupError."""
    module_name, _, qualname = target.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise LookupError(f"module {module_name} does not import ({exc})") from exc
    *path, attr = qualname.split(".")
    for part in path:
        if not hasattr(owner, part):
            raise LookupError(f"{module_name} has no {part}")
        owner = getattr(owner, part)
    if isinstance(owner, type):
        if attr not in owner.__dict__:
            raise LookupError(f"{owner.__qualname__} defines no {attr}")
        return owner, attr, owner.__dict__[attr]
    if not hasattr(owner, attr):
        raise LookupError(f"{module_name} has no {attr}")
    return owner, attr, getattr(owner, attr)


# --- byte counting for collectives --------------------------------------------------------


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    numel = getattr(obj, "numel", None)
    size = getattr(obj, "element_size", None)
    if callable(numel) and callable(size):
        return int(numel()) * int(size())
    return 0


#: Position of the input tensor(s) among each collective's arguments.
_COMM_INPUT_ARG = {
    "all_reduce": 0,
    "broadcast": 0,
    "all_gather": 1,
    "all_gather_into_tensor": 1,
    "reduce_scatter": 1,
}
_COMM_INPUT_KW = {
    "all_reduce": "tensor",
    "broadcast": "tensor",
    "all_gather": "tensor",
    "all_gather_into_tensor": "input_tensor",
    "reduce_scatter": "input_list",
}

# lmdeploy's wrappers call torch.distributed themselves: count such a call once.
_inside = threading.local()


def _comm_factory(op: str, source: str) -> Factory:
    def factory(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Callable[..., Any]:
        index = _COMM_INPUT_ARG[op]
        keyword = _COMM_INPUT_KW[op]

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if source == "torch" and int(getattr(_inside, "depth", 0)) > 0:
                return original(*args, **kwargs)
            payload = args[index] if len(args) > index else kwargs.get(keyword)
            _inside.depth = int(getattr(_inside, "depth", 0)) + 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                _inside.depth -= 1
                hooks.comm.append(
                    CommEvent(op, _tensor_bytes(payload), time.perf_counter() - start, source)
                )

        return wrapper

    return factory


def _group_all_reduce(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    @functools.wraps(original)
    def all_reduce_(self: Any, tensor: Any) -> Any:
        _inside.depth = int(getattr(_inside, "depth", 0)) + 1
        start = time.perf_counter()
        try:
            return original(self, tensor)
        finally:
            _inside.depth -= 1
            hooks.comm.append(
                CommEvent(
                    "all_reduce", _tensor_bytes(tensor), time.perf_counter() - start, "lmdeploy"
                )
            )

    return all_reduce_


def _fused_rms_norm(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    @functools.wraps(original)
    def try_fused(self: Any, input: Any, residual: Any, weight: Any, eps: float) -> Any:
        start = time.perf_counter()
        fused = hooks.fused_all_reduce_rms_norm
        result = fused(input, residual, weight, eps) if fused is not None else None
        source = "fused"
        if result is None:
            result = original(self, input=input, residual=residual, weight=weight, eps=eps)
            source = "lmdeploy"
        if result is not None:
            hooks.comm.append(
                CommEvent(
                    "all_reduce_rms_norm",
                    _tensor_bytes(input),
                    time.perf_counter() - start,
                    source,
                )
            )
        return result

    return try_fused


# --- prefix reuse ---------------------------------------------------------------------------


def _real_blocks(seq: Any) -> list[int]:
    return [int(b) for b in seq.logical_blocks.get_real_blocks()]


def _match(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    pending: dict[int, PrefixMatchEvent] = state.setdefault("pending", {})

    @functools.wraps(original)
    def match(self: Any, seq: Any) -> Any:
        num_blocks, num_history = int(seq.num_blocks), int(seq.num_history_ids)
        result = original(self, seq)
        event = PrefixMatchEvent(
            "match",
            int(seq.seq_id),
            int(seq.num_history_ids) - num_history,
            tuple(_real_blocks(seq)[num_blocks:]),
        )
        hooks.matches.append(event)
        pending[event.seq_id] = event
        if state["series"] == "0.11":  # no tentative phase: a match is final
            _accept_match(hooks, pending.pop(event.seq_id))
        return result

    return match


def _accept_match(hooks: LMDeployHooks, event: PrefixMatchEvent) -> None:
    policy = hooks.eviction_policy
    if policy is not None:
        for block_id in event.block_ids:
            if block_id in policy:
                policy.access(block_id)


def _commit(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    pending: dict[int, PrefixMatchEvent] = state.setdefault("pending", {})

    @functools.wraps(original)
    def commit(self: Any) -> Any:
        event = pending.pop(int(self.seq.seq_id), None)
        result = original(self)
        if event is not None:
            final = PrefixMatchEvent(
                "commit", event.seq_id, event.num_matched_tokens, event.block_ids
            )
            hooks.matches.append(final)
            _accept_match(hooks, final)
        return result

    return commit


def _rollback(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    pending: dict[int, PrefixMatchEvent] = state.setdefault("pending", {})

    @functools.wraps(original)
    def rollback(self: Any, reason: str) -> Any:
        event = pending.pop(int(self.seq.seq_id), None)
        result = original(self, reason)
        if event is not None:
            hooks.matches.append(
                PrefixMatchEvent(
                    "rollback", event.seq_id, event.num_matched_tokens, event.block_ids
                )
            )
        return result

    return rollback


def _cursor_len(seq: Any) -> int:
    """Tokens on the sequence's attached trie path (0.18 cursor, 0.11 last shared node)."""
    prefix_cache = getattr(seq, "prefix_cache", None)
    node = getattr(prefix_cache, "trie_cursor", None)
    if node is None:
        node = getattr(seq.logical_blocks, "last_shared_node", None)
    if node is None:
        return 0
    return int(getattr(node, "prefix_len", getattr(node, "num_matched", 0)))


def _store(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    @functools.wraps(original)
    def allocate(self: Any, seq: Any) -> Any:
        block_size = int(self.block_size)
        before = _cursor_len(seq) // block_size
        result = original(self, seq)
        after = _cursor_len(seq) // block_size
        if after <= before:
            return result
        blocks = _real_blocks(seq)[:after]
        event = PrefixStoreEvent(int(seq.seq_id), tuple(blocks), tuple(blocks[before:]))
        hooks.stores.append(event)
        policy = hooks.eviction_policy
        if policy is not None:
            keys: set[int] = state.setdefault("policy_keys", set())
            for block_id in event.new_block_ids:
                if block_id not in policy:
                    policy.insert(block_id, features={"num_blocks": 1.0})
                    keys.add(block_id)
        if hooks.prefix_index is not None:
            tokens = [int(t) for t in seq.all_ids[: after * block_size]]
            hooks.prefix_index.insert(tokens, blocks, getattr(seq, "adapter_name", None) or "")
        return result

    return allocate


def _node_block(node: Any) -> int:
    return int(node.block_id if hasattr(node, "block_id") else node.block)


def _node_tokens(node: Any) -> list[int]:
    tokens = node.token_ids if hasattr(node, "token_ids") else node.tokens
    return [int(t) for t in tokens]


def _path(node: Any) -> list[Any]:
    path = []
    while node is not None and node.parent is not None:  # stop at the adapter root
        path.append(node)
        node = node.parent
    return path[::-1]


def _trie_nodes(leaves: Iterable[Any]) -> set[Any]:
    return {n for leaf in leaves for n in _path(leaf)}


def _rebuild_index(hooks: LMDeployHooks, leaves: Iterable[Any]) -> None:
    """Make the sageLLM prefix index hold exactly lmdeploy's trie paths again."""
    index = hooks.prefix_index
    if index is None:
        return
    index.clear()
    for leaf in leaves:
        path = _path(leaf)
        if path:
            tokens = [t for n in path for t in _node_tokens(n)]
            index.insert(
                tokens, [_node_block(n) for n in path], getattr(leaf, "adapter_name", "") or ""
            )


def _evict_observed(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    """Trie eviction: lmdeploy's LRU, or the sageLLM policy's victims when one is set."""

    @functools.wraps(original)
    def evict(self: Any, max_num_blocks: int) -> Any:
        if hooks.eviction_policy is not None and state["series"] == "0.18":
            victims = _policy_evict(self, hooks, state, int(max_num_blocks))
            if victims:
                hooks.emit_eviction(EvictionEvent(tuple(victims), "policy"))
                _rebuild_index(hooks, self.leaves)
            return len(victims)
        nodes = _trie_nodes(self.leaves)
        result = original(self, max_num_blocks)
        gone = sorted(_node_block(n) for n in nodes if n.parent is None)
        if gone:
            keys: set[int] = state.setdefault("policy_keys", set())
            for block_id in gone:
                if block_id in keys and hooks.eviction_policy is not None:
                    hooks.eviction_policy.remove(block_id)
                keys.discard(block_id)
            hooks.emit_eviction(EvictionEvent(tuple(gone), "lmdeploy"))
            _rebuild_index(hooks, self.leaves)
        return result

    return evict


def _policy_evict(
    lifecycle: Any, hooks: LMDeployHooks, state: dict[str, Any], num: int
) -> list[int]:
    """Evict up to ``num`` trie leaves chosen one at a time by the eviction policy.

    Only leaves lmdeploy itself could evict are offered (attached, ref count 1 = held by
    the trie alone, no pinned state checkpoint); every other key the policy holds is
    pinned for the call, so the policy orders exactly lmdeploy's candidates.
    """
    import numpy as np

    policy = hooks.eviction_policy
    assert policy is not None
    keys: set[int] = state.setdefault("policy_keys", set())
    evicted: list[int] = []
    while len(evicted) < num:
        candidates = {
            int(leaf.block_id): leaf
            for leaf in lifecycle.leaves
            if lifecycle._is_leaf_eviction_candidate(leaf)
            and not lifecycle.state_checkpoints.is_pinned(leaf)
            and int(lifecycle.allocator.get_ref_count(leaf.block_id)) == 1
        }
        if not candidates:
            break
        for block_id in candidates:
            if block_id not in policy:
                policy.insert(block_id, features={"num_blocks": 1.0})
                keys.add(block_id)
        others = [k for k in keys if k not in candidates]
        for key in others:
            policy.pin(key)
        try:
            decision = policy.evict(1)
        finally:
            for key in others:
                policy.unpin(key)
        if not decision.victims:
            break
        block_id = int(decision.victims[0])
        keys.discard(block_id)
        leaf = candidates[block_id]
        lifecycle.state_checkpoints.release_checkpoint(leaf)
        parent = leaf.parent
        leaf.detach_leaf()
        lifecycle.leaves.discard(leaf)
        if parent is not None and lifecycle._is_attached_leaf(parent):
            lifecycle.leaves.add(parent)
        evicted.append(block_id)
    if evicted:
        lifecycle.allocator.free(np.array(evicted))
    return evicted


# --- scheduling -----------------------------------------------------------------------------


def _reorder(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    @functools.wraps(original)
    def reorder(self: Any, waiting: Any, turn_policy: Any) -> Any:
        ordered = list(original(self, waiting, turn_policy))
        policy = hooks.scheduling_policy
        if policy is None:
            return ordered
        by_id = {int(seq.seq_id): seq for seq in ordered}
        chosen = [int(i) for i in policy.order_prefills([view_of(s) for s in ordered])]
        unknown = [i for i in chosen if i not in by_id]
        if unknown or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"scheduling policy ordered seq ids {chosen}; each must be one of the waiting "
                f"ids {sorted(by_id)} at most once"
            )
        return [by_id[i] for i in chosen] + [s for s in ordered if int(s.seq_id) not in set(chosen)]

    return reorder


def _admission(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    @functools.wraps(original)
    def run(self: Any) -> Any:
        policy = hooks.scheduling_policy
        if policy is not None and not policy.admit_prefill(view_of(self.seq), state["admitted"]):
            result_cls = sys.modules[type(self).__module__]._PrefillAdmissionResult
            return result_cls.skip()
        result = original(self)
        if getattr(result.action, "name", "") == "ADMIT":
            state["admitted"] += 1
        return result

    return run


def _prefill_batch(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    @functools.wraps(original)
    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        state["admitted"] = 0
        running = original(self, *args, **kwargs)
        hooks.admitted_prefills.append([int(s.seq_id) for s in running])
        return running

    return schedule


def _prefill_batch_011(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    @functools.wraps(original)
    def _schedule_prefill(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        hooks.admitted_prefills.append([int(s.seq_id) for s in output[0]])
        return output

    return _schedule_prefill


def _schedule_running(original: Any, hooks: LMDeployHooks, state: dict[str, Any]) -> Any:
    @functools.wraps(original)
    def schedule_running(self: Any, running: Any, *args: Any, **kwargs: Any) -> Any:
        policy = hooks.scheduling_policy
        if policy is None:
            return original(self, running, *args, **kwargs)
        running = list(running)
        ids = {int(s.seq_id) for s in running}
        chosen = [int(i) for i in policy.preempt_decodes([view_of(s) for s in running])]
        if not set(chosen) <= ids:
            raise ValueError(
                f"scheduling policy preempts seq ids {chosen}; each must be one of the running "
                f"ids {sorted(ids)}"
            )
        victims = [s for s in running if int(s.seq_id) in set(chosen)]
        self.preempt_seqs(victims)
        hooks.preempted.extend(int(s.seq_id) for s in victims)
        kept = [s for s in running if int(s.seq_id) not in set(chosen)]
        kept_mask = iter(original(self, kept, *args, **kwargs) if kept else [])
        return [False if int(s.seq_id) in set(chosen) else next(kept_mask) for s in running]

    return schedule_running


# --- the table ------------------------------------------------------------------------------

_PAGING = "lmdeploy.pytorch.paging"
_DIST = "lmdeploy.pytorch.distributed"
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter")
_BOTH = ("0.11", "0.18")

#: Every patch, by release series. 0.11 gets observers only for scheduling (its order
#: and admission live in closures inside ``Scheduler._schedule_prefill``).
PATCHES: tuple[PatchSpec, ...] = (
    PatchSpec("prefix.match", f"{_PAGING}.block_trie.trie:BlockTrie.match", ("0.18",), _match),
    PatchSpec("prefix.match", f"{_PAGING}.block_trie:BlockTrie.match", ("0.11",), _match),
    PatchSpec(
        "prefix.commit",
        f"{_PAGING}.prefill_scheduler:_TentativePrefixMatch.commit",
        ("0.18",),
        _commit,
    ),
    PatchSpec(
        "prefix.rollback",
        f"{_PAGING}.prefill_scheduler:_TentativePrefixMatch.rollback",
        ("0.18",),
        _rollback,
    ),
    PatchSpec("prefix.store", f"{_PAGING}.block_trie.trie:BlockTrie.allocate", ("0.18",), _store),
    PatchSpec("prefix.store", f"{_PAGING}.block_trie:BlockTrie.allocate", ("0.11",), _store),
    PatchSpec(
        "kv.evict",
        f"{_PAGING}.block_trie.kv_lifecycle:KVBlockLifecycle.evict",
        ("0.18",),
        _evict_observed,
        requires=("_is_leaf_eviction_candidate", "_is_attached_leaf"),
    ),
    PatchSpec("kv.evict", f"{_PAGING}.block_trie:BlockTrie.evict", ("0.11",), _evict_observed),
    PatchSpec(
        "scheduling.order",
        f"{_PAGING}.prefill_scheduler:_PrefillReorderer.reorder",
        ("0.18",),
        _reorder,
    ),
    PatchSpec(
        "scheduling.admit",
        f"{_PAGING}.prefill_scheduler:_PrefillAdmissionAttempt.run",
        ("0.18",),
        _admission,
    ),
    PatchSpec(
        "scheduling.prefill_batch",
        f"{_PAGING}.prefill_scheduler:_PrefillScheduler.schedule",
        ("0.18",),
        _prefill_batch,
    ),
    PatchSpec(
        "scheduling.prefill_batch",
        f"{_PAGING}.scheduler:Scheduler._schedule_prefill",
        ("0.11",),
        _prefill_batch_011,
    ),
    PatchSpec(
        "scheduling.preempt",
        f"{_PAGING}.scheduler:Scheduler.schedule_running",
        ("0.18",),
        _schedule_running,
        requires=("preempt_seqs",),
    ),
    *(
        PatchSpec(
            f"comm.lmdeploy.{op}",
            f"{_DIST}:{op}",
            _BOTH,
            _comm_factory(op, "lmdeploy"),
            rebind_importers=True,
        )
        for op in _COLLECTIVES
    ),
    *(
        PatchSpec(
            f"comm.torch.{op}",
            f"torch.distributed:{op}",
            _BOTH,
            _comm_factory(op, "torch"),
            rebind_importers=True,
        )
        for op in _COLLECTIVES
    ),
    PatchSpec(
        "comm.group.all_reduce_", f"{_DIST}:DistGroup.all_reduce_", ("0.18",), _group_all_reduce
    ),
    PatchSpec(
        "fusion.all_reduce_rms_norm",
        f"{_DIST}:DistGroup.try_fused_all_reduce_residual_rms_norm",
        ("0.18",),
        _fused_rms_norm,
    ),
)


def _status(spec: PatchSpec, series: str | None) -> PatchStatus:
    if series is None:
        return PatchStatus(spec.name, spec.target, spec.series, False, "lmdeploy is not installed")
    if series not in spec.series:
        return PatchStatus(spec.name, spec.target, spec.series, False, f"not for lmdeploy {series}")
    try:
        owner, _, _ = _resolve(spec.target)
    except LookupError as exc:
        return PatchStatus(spec.name, spec.target, spec.series, False, f"target moved: {exc}")
    missing = [r for r in spec.requires if not hasattr(owner, r)]
    if missing:
        return PatchStatus(
            spec.name, spec.target, spec.series, False, f"target moved: no {', '.join(missing)}"
        )
    return PatchStatus(spec.name, spec.target, spec.series, True, "")


def patch_statuses(version: str | None = None) -> list[PatchStatus]:
    """Every patch and whether it applies to lmdeploy ``version`` (default: installed).

    Imports the target modules (lmdeploy must import) but changes nothing.
    """
    version = version if version is not None else installed_version()
    series = None
    if version is not None:
        try:
            series = check_version(version)
        except ConfigError as exc:
            return [PatchStatus(s.name, s.target, s.series, False, str(exc)) for s in PATCHES]
    return [_status(spec, series) for spec in PATCHES if series is None or series in spec.series]


_active_lock = threading.Lock()
_active: list[LMDeployPatcher] = []


class LMDeployPatcher:
    """Applies every patch of the installed lmdeploy's series; :meth:`unpatch` undoes them.

    ``version`` defaults to the installed lmdeploy's; an unknown series raises
    :class:`~sagellm.engine.runtime.lmdeploy.versions.UnsupportedLMDeployVersionError`, a
    moved target :class:`PatchTargetMissingError` (nothing is left patched). One patcher
    is active per process, since patches change lmdeploy's classes for everyone.

    Usage::

        hooks = LMDeployHooks(scheduling_policy=ShortestPromptFirstPolicy())
        with LMDeployPatcher(hooks):
            ...  # drive lmdeploy's Scheduler; hooks.matches, hooks.evictions fill up
    """

    def __init__(self, hooks: LMDeployHooks | None = None, *, version: str | None = None) -> None:
        found = version if version is not None else installed_version()
        if found is None:
            raise ConfigError(
                "lmdeploy is not installed; install it with `pip install --no-deps lmdeploy` "
                "(see the LMDeploy runtime section of sagellm-engine's README)"
            )
        self.version = found
        self.series = check_version(found)
        self.hooks = hooks if hooks is not None else LMDeployHooks()
        self._state: dict[str, Any] = {"series": self.series, "admitted": 0}
        self._saved: list[tuple[Any, str, Any]] = []
        self.applied: list[str] = []

    @property
    def is_applied(self) -> bool:
        return bool(self._saved)

    def apply(self) -> LMDeployPatcher:
        """Patch every target of this series; all or nothing."""
        with _active_lock:
            if _active:
                raise ConfigError(
                    "an LMDeployPatcher is already applied in this process; call its unpatch() first"
                )
            specs = [s for s in PATCHES if self.series in s.series]
            statuses = [_status(s, self.series) for s in specs]
            moved = [st for st in statuses if not st.applies]
            if moved:
                details = "; ".join(f"{st.name} ({st.target}): {st.reason}" for st in moved)
                raise PatchTargetMissingError(
                    f"lmdeploy {self.version}: {len(moved)} patch target(s) moved: {details}; "
                    "the patches need updating for this release"
                )
            for spec in specs:
                owner, attr, original = _resolve(spec.target)
                wrapper = spec.factory(original, self.hooks, self._state)
                self._set(owner, attr, original, wrapper)
                if spec.rebind_importers:
                    for module in list(sys.modules.values()):
                        name = getattr(module, "__name__", "") or ""
                        if module is owner or not name.startswith("lmdeploy"):
                            continue
                        if module.__dict__.get(attr) is original:
                            self._set(module, attr, original, wrapper)
                self.applied.append(spec.name)
            _active.append(self)
        return self

    def _set(self, owner: Any, attr: str, original: Any, wrapper: Any) -> None:
        self._saved.append((owner, attr, original))
        setattr(owner, attr, wrapper)

    def unpatch(self) -> None:
        """Put back every original object, last patched first."""
        with _active_lock:
            while self._saved:
                owner, attr, original = self._saved.pop()
                setattr(owner, attr, original)
            self.applied = []
            if self in _active:
                _active.remove(self)

    def __enter__(self) -> LMDeployPatcher:
        return self.apply()

    def __exit__(self, *exc: object) -> None:
        self.unpatch()
