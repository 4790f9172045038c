"""Reference-counted block ids with an O(1) free list, shared by every tier."""

from __future__ import annotations

import operator
import time
from collections.abc import Sequence

import numpy as np

from sagellm.core.telemetry import KVPoolStats
from sagellm.core.types import KVBlockInfo

__all__ = ["BlockAllocator", "fragmentation"]


def fragmentation(free_block_ids: Sequence[int]) -> float:
    """``1 - longest run of consecutive free ids / number of free ids``.

    0.0 when the free blocks form one contiguous range (or there are none); it approaches
    1.0 as the free blocks scatter into single-block holes.
    """
    n = len(free_block_ids)
    if n <= 1:
        return 0.0
    ids = np.sort(np.fromiter(free_block_ids, dtype=np.int64, count=n))
    breaks = np.flatnonzero(np.diff(ids) != 1)
    if breaks.size == 0:
        return 0.0
    bounds = np.concatenate(([0], breaks + 1, [n]))
    return 1.0 - float(np.diff(bounds).max()) / n


def _as_block_id(value: object, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: block ids must be int, got {value!r} (bool)")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"{where}: block ids must be int, got {value!r} ({type(value).__name__})"
        ) from None


class BlockAllocator:
    """Block bookkeeping without storage: reference counts, free list, owners, stats.

    Allocation order: the free list is a LIFO stack. A fresh allocator hands out
    ``0, 1, 2, ...`` in that order; blocks released by :meth:`free` are reused first, in
    the order they were released (``free([5, 6, 7])`` then ``allocate(3)`` returns
    ``[5, 6, 7]``), because recently used memory is the most likely to still be in cache.

    Costs: ``allocate(k)`` and ``free(ids)`` are O(k) list operations on Python ints; no
    scan over the pool and no tensor is created on these paths. Not thread-safe: one
    engine loop owns a pool.
    """

    def __init__(self, num_blocks: int, *, tier: str, block_bytes: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a pool needs at least one block, got num_blocks={num_blocks}")
        self._capacity = num_blocks
        self._tier = tier
        self._block_bytes = block_bytes
        self._ref = [0] * num_blocks
        # stack: the next block handed out is the last element
        self._free = list(range(num_blocks - 1, -1, -1))
        self._tenant = [""] * num_blocks
        self._last_access = [0.0] * num_blocks
        self._num_allocations = 0
        self._num_failed_allocations = 0
        self._num_frees = 0

    # ------------------------------------------------------------------ KVPool surface

    @property
    def num_blocks(self) -> int:
        """Capacity in blocks (fixed at construction)."""
        return self._capacity

    @property
    def num_free_blocks(self) -> int:
        """Blocks with reference count 0."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with a reference count above 0."""
        return self._capacity - len(self._free)

    @property
    def tier(self) -> str:
        """Name of the tier this pool is ("device", "host", "disk")."""
        return self._tier

    def can_allocate(self, num_blocks: int) -> bool:
        """True when :meth:`allocate` of ``num_blocks`` would succeed now; no side effect."""
        return 0 <= num_blocks <= len(self._free)

    def allocate(self, num_blocks: int, tenant: str = "") -> list[int] | None:
        """Hand out ``num_blocks`` distinct free blocks, each with reference count 1.

        ``tenant`` is recorded as the owner of the blocks (see :meth:`block_info`).
        Returns ``None`` and changes nothing (except the failure counter) when fewer
        blocks are free. Raises ValueError for a negative or non-integer count.
        """
        free = self._free
        if type(num_blocks) is not int or num_blocks <= 0 or num_blocks > len(free):
            if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
                raise ValueError(
                    f"allocate: num_blocks must be an int, got {num_blocks!r} "
                    f"({type(num_blocks).__name__})"
                )
            if num_blocks < 0:
                raise ValueError(f"allocate: num_blocks must be >= 0, got {num_blocks}")
            if num_blocks == 0:
                self._num_allocations += 1
                return []
            if num_blocks > len(free):
                self._num_failed_allocations += 1
                return None
            num_blocks = int(num_blocks)  # an int subclass
        block_ids = free[-num_blocks:]
        del free[-num_blocks:]
        block_ids.reverse()
        ref = self._ref
        owner = self._tenant
        last = self._last_access
        now = time.monotonic()
        for b in block_ids:
            ref[b] = 1
            owner[b] = tenant
            last[b] = now
        self._num_allocations += 1
        return block_ids

    def share(self, block_ids: Sequence[int]) -> None:
        """Add one reference to each block; every block must be allocated.

        Raises ValueError naming the first bad block, without changing any block.
        """
        ref = self._ref
        n = self._capacity
        for b in block_ids:
            if type(b) is not int or not 0 <= b < n or ref[b] == 0:
                ids = self._normalise(block_ids, "share")
                for c in ids:
                    if ref[c] == 0:
                        raise ValueError(
                            f"share: block {c} is free; only allocated blocks can be shared "
                            "(allocate it first)"
                        )
                block_ids = ids
                break
        now = time.monotonic()
        last = self._last_access
        for b in block_ids:
            ref[b] += 1
            last[b] = now

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; a block at 0 returns to the free list.

        A block may appear several times in one call (one reference each). Blocks that
        reach 0 are reused first, in the order of their first appearance in the call. An
        unknown id, a free block, or more frees of a block than it has references raises
        ValueError naming the block, and no block changes.
        """
        ref = self._ref
        n = self._capacity
        free = self._free
        num_free = len(free)
        # one pass from the back, pushing blocks that reach 0: the stack's top then holds
        # the call's first block; on a bad id undo what was done, then explain
        backwards = reversed(block_ids)
        for b in backwards:
            if type(b) is not int or not 0 <= b < n or ref[b] == 0:
                i = operator.length_hint(backwards)  # index of b: items left before it
                for c in block_ids[i + 1 :]:
                    ref[c] += 1
                del free[num_free:]
                self._reject_free(block_ids, i)
                return
            r = ref[b] - 1
            ref[b] = r
            if r == 0:
                free.append(b)
        self._num_frees += len(free) - num_free

    def ref_count(self, block_id: int) -> int:
        """Current reference count of ``block_id`` (0 when free)."""
        if type(block_id) is not int or not 0 <= block_id < self._capacity:
            block_id = self._normalise([block_id], "ref_count")[0]
        return self._ref[block_id]

    def touch(self, block_ids: Sequence[int]) -> None:
        """Record an access to each block now (``last_access`` of :meth:`block_info`)."""
        now = time.monotonic()
        last = self._last_access
        for b in self._normalise(block_ids, "touch"):
            last[b] = now

    def block_info(self, block_id: int) -> KVBlockInfo:
        """What the pool knows about one block (a free block has no tenant)."""
        b = self._normalise([block_id], "block_info")[0]
        ref = self._ref[b]
        return KVBlockInfo(
            block_id=b,
            tier=self._tier,
            size_bytes=self._block_bytes,
            ref_count=ref,
            tenant_id=self._tenant[b] if ref else "",
            last_access=self._last_access[b],
        )

    def used_block_ids(self) -> list[int]:
        """Allocated blocks in increasing id order (O(num_blocks))."""
        ref = self._ref
        return [b for b in range(self._capacity) if ref[b]]

    def fragmentation(self) -> float:
        """Fragmentation of the free blocks, see :func:`fragmentation`."""
        return fragmentation(self._free)

    def make_stats(self) -> KVPoolStats:
        """A :class:`KVPoolStats` snapshot; resets the event counters.

        ``fragmentation`` is ``1 - longest run of consecutive free block ids / free
        blocks`` (0.0 when no block is free or the free blocks are one contiguous range),
        computed now in O(free blocks * log).
        """
        used = self.num_used_blocks
        stats = KVPoolStats(
            num_blocks=self._capacity,
            num_used_blocks=used,
            num_free_blocks=len(self._free),
            utilization=used / self._capacity,
            fragmentation=fragmentation(self._free),
            num_allocations=self._num_allocations,
            num_failed_allocations=self._num_failed_allocations,
            num_frees=self._num_frees,
        )
        self._num_allocations = 0
        self._num_failed_allocations = 0
        self._num_frees = 0
        return stats

    def defragment(self) -> dict[int, int]:
        """Move the used blocks to the lowest ids; returns ``{old_id: new_id}`` of moved ones.

        With ``u`` used blocks, every used block with id ``>= u`` moves to a free id below
        ``u`` (the moved blocks keep their relative order, the lowest holes are filled
        first); blocks already below ``u`` stay. Content, reference count, tenant and last
        access move with the block. Afterwards the free list hands out ``u, u+1, ...``.
        Whoever holds block ids (block tables, prefix indexes) must apply the mapping.
        """
        ref = self._ref
        used = self.used_block_ids()
        num_used = len(used)
        holes = [b for b in range(num_used) if ref[b] == 0]
        movers = [b for b in used if b >= num_used]
        assert len(holes) == len(movers)
        mapping = dict(zip(movers, holes))
        if mapping:
            self._move_content(movers, holes)
            owner = self._tenant
            last = self._last_access
            for old, new in mapping.items():
                ref[new], ref[old] = ref[old], 0
                owner[new], owner[old] = owner[old], ""
                last[new] = last[old]
        self._free = list(range(self._capacity - 1, num_used - 1, -1))
        return mapping

    # ------------------------------------------------------------------ internals

    def _move_content(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Copy the stored content of ``src_ids[i]`` to ``dst_ids[i]`` (storage classes)."""

    def _normalise(self, block_ids: Sequence[int], where: str) -> list[int]:
        """``block_ids`` as ints, each a known id; raises ValueError otherwise."""
        n = self._capacity
        out = []
        for value in block_ids:
            b = _as_block_id(value, where)
            if not 0 <= b < n:
                raise ValueError(
                    f"{where}: unknown block id {b}; this {self._tier} pool has blocks 0..{n - 1}"
                )
            out.append(b)
        return out

    def _reject_free(self, block_ids: Sequence[int], index: int) -> None:
        """Raise the ValueError for ``free(block_ids)`` failing at ``block_ids[index]``.

        Ids that are not plain ints but are integers (numpy ints) are retried as ints.
        """
        ids = self._normalise(block_ids, "free")
        if any(type(x) is not int for x in block_ids):
            self.free(ids)
            return
        self._raise_bad_free(ids, index)

    def _raise_bad_free(self, block_ids: list[int], index: int) -> None:
        b = block_ids[index]
        later = block_ids[index + 1 :].count(b)  # processed first: the pass runs backwards
        if later:
            total = block_ids.count(b)
            raise ValueError(
                f"free: block {b} appears {total} times in this call but holds only "
                f"{later} reference(s); free each reference once"
            )
        raise ValueError(
            f"free: block {b} is already free (reference count 0); "
            "free only blocks you allocated or shared, once per reference"
        )
