"""What the patched lmdeploy reports to sageLLM, and the sageLLM policies that steer it.

Anchor: vLLM v1's ``SchedulerOutput`` (plain records of ids and counts). One
:class:`LMDeployHooks` object is shared by every patch of one :class:`LMDeployPatcher`;
observers read its event lists, policies plugged into it change lmdeploy's decisions.
Block ids are lmdeploy's logical ids (the ids its allocator and trie use; see
:meth:`LMDeployKVManager.get_block_info` for the physical table).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sagellm.core.protocols import EvictionPolicy, PrefixIndex

__all__ = [
    "CommEvent",
    "EvictionEvent",
    "LMDeployHooks",
    "LMDeploySchedulingPolicy",
    "PrefixMatchEvent",
    "PrefixStoreEvent",
    "SequenceView",
    "ShortestPromptFirstPolicy",
    "view_of",
]


@dataclass(frozen=True, slots=True)
class SequenceView:
    """A read-only summary of one lmdeploy sequence, handed to scheduling policies."""

    seq_id: int
    session_id: int
    num_tokens: int  # every token of the sequence (prompt and generated)
    num_blocks: int  # logical blocks it holds now
    arrive_time: float


def view_of(seq: Any) -> SequenceView:
    """The :class:`SequenceView` of an lmdeploy ``SchedulerSequence``."""
    return SequenceView(
        seq_id=int(seq.seq_id),
        session_id=int(seq.session_id),
        num_tokens=int(seq.num_all_ids),
        num_blocks=int(seq.num_blocks),
        arrive_time=float(seq.arrive_time),
    )


@dataclass(frozen=True, slots=True)
class PrefixMatchEvent:
    """A trie lookup: ``phase`` is ``match`` (tentative), ``commit`` or ``rollback``."""

    phase: str
    seq_id: int
    num_matched_tokens: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PrefixStoreEvent:
    """Full blocks of a sequence the trie holds after a store, and the newly stored ones."""

    seq_id: int
    block_ids: tuple[int, ...]  # every full block on the sequence's trie path
    new_block_ids: tuple[int, ...]  # those this store attached


@dataclass(frozen=True, slots=True)
class EvictionEvent:
    """Blocks lmdeploy's trie freed; ``chooser`` is ``lmdeploy`` (LRU) or ``policy``."""

    block_ids: tuple[int, ...]
    chooser: str


@dataclass(frozen=True, slots=True)
class CommEvent:
    """One collective call: its name, bytes of its input tensors and wall seconds."""

    op: str
    num_bytes: int
    seconds: float
    source: str  # "lmdeploy" (its wrappers), "torch" (direct torch.distributed), "fused"


@runtime_checkable
class LMDeploySchedulingPolicy(Protocol):
    """External scheduling decisions for lmdeploy's scheduler.

    sagellm-core has no per-decision scheduler policy protocol (its ``Scheduler`` owns a
    whole step), so this is the narrow form lmdeploy's scheduler can consult. Anchor:
    vLLM v1's ``RequestQueue`` (ordering) and its preemption of the lowest-priority
    running request.
    """

    def order_prefills(self, waiting: Sequence[SequenceView]) -> Sequence[int]:
        """Seq ids in the order prefills are tried; ids left out follow in lmdeploy's order."""
        ...

    def admit_prefill(self, seq: SequenceView, num_admitted: int) -> bool:
        """Whether ``seq`` may be admitted after ``num_admitted`` others this step."""
        ...

    def preempt_decodes(self, running: Sequence[SequenceView]) -> Sequence[int]:
        """Seq ids of running decodes to preempt (back to waiting) before this step."""
        ...


class ShortestPromptFirstPolicy:
    """Shortest prefill first, at most ``max_prefills`` per step; preempts nothing."""

    def __init__(self, max_prefills: int | None = None) -> None:
        if max_prefills is not None and max_prefills < 1:
            raise ValueError(f"max_prefills must be at least 1 or None, got {max_prefills}")
        self.max_prefills = max_prefills

    def order_prefills(self, waiting: Sequence[SequenceView]) -> list[int]:
        return [v.seq_id for v in sorted(waiting, key=lambda v: (v.num_tokens, v.arrive_time))]

    def admit_prefill(self, seq: SequenceView, num_admitted: int) -> bool:
        return self.max_prefills is None or num_admitted < self.max_prefills

    def preempt_decodes(self, running: Sequence[SequenceView]) -> list[int]:
        return []


FusedAllReduceRMSNorm = Callable[[Any, Any, Any, float], Any]


@dataclass
class LMDeployHooks:
    """Event sinks and steering policies shared by the patches of one patcher.

    ``prefix_index`` mirrors lmdeploy's trie (stores are inserted, evictions rebuild it);
    ``eviction_policy`` chooses the trie's victims in place of lmdeploy's LRU;
    ``scheduling_policy`` orders and admits prefills and preempts decodes;
    ``fused_all_reduce_rms_norm(input, residual, weight, eps)`` replaces lmdeploy's fused
    all-reduce + residual + RMSNorm where it returns a result (``None``: lmdeploy's runs).
    """

    prefix_index: PrefixIndex | None = None
    eviction_policy: EvictionPolicy | None = None
    scheduling_policy: LMDeploySchedulingPolicy | None = None
    fused_all_reduce_rms_norm: FusedAllReduceRMSNorm | None = None
    matches: list[PrefixMatchEvent] = field(default_factory=list)
    stores: list[PrefixStoreEvent] = field(default_factory=list)
    evictions: list[EvictionEvent] = field(default_factory=list)
    admitted_prefills: list[list[int]] = field(default_factory=list)  # seq ids per step
    preempted: list[int] = field(default_factory=list)
    comm: list[CommEvent] = field(default_factory=list)
    eviction_callbacks: list[Callable[[EvictionEvent], None]] = field(default_factory=list)

    def emit_eviction(self, event: EvictionEvent) -> None:
        """Record an eviction and tell every registered callback, in registration order."""
        self.evictions.append(event)
        for callback in list(self.eviction_callbacks):
            callback(event)

    def comm_totals(self) -> dict[str, tuple[int, int, float]]:
        """Per collective: (calls, bytes, seconds) over every recorded call."""
        totals: dict[str, tuple[int, int, float]] = {}
        for ev in self.comm:
            calls, num_bytes, seconds = totals.get(ev.op, (0, 0, 0.0))
            totals[ev.op] = (calls + 1, num_bytes + ev.num_bytes, seconds + ev.seconds)
        return totals
