"""Fusion of small all-reduces into buckets (DDP's ``bucket_cap_mb`` as the anchor).

DDP packs gradients into buckets of at most ``bucket_cap_mb`` (25 MB) and all-reduces
each bucket as one flat tensor. Here :func:`assign_buckets` decides the packing (same
dtype and device per bucket, order kept, a bucket closes before it would exceed the
cap, a tensor larger than the cap alone), and :func:`all_reduce_coalesced` runs it over
any :class:`~sagellm.core.protocols.CommBackend`: one collective per bucket instead of
one per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["Bucketer", "all_reduce_coalesced", "assign_buckets"]


def assign_buckets(sizes: Sequence[int], kinds: Sequence[Any], cap_bytes: int) -> list[list[int]]:
    """Indices of the tensors in each bucket.

    ``sizes`` are byte counts, ``kinds`` anything that must match inside a bucket (dtype
    and device). Every index appears once; buckets keep the input order of their
    members; a bucket holds one kind; its bytes stay within ``cap_bytes`` unless it
    holds a single tensor larger than the cap. Open buckets of different kinds fill in
    parallel, as DDP's per-dtype buckets do.
    """
    if len(sizes) != len(kinds):
        raise ValueError(f"{len(sizes)} sizes but {len(kinds)} kinds")
    if cap_bytes <= 0:
        raise ValueError(f"cap_bytes must be positive, got {cap_bytes}")
    done: list[list[int]] = []
    open_: dict[Any, tuple[list[int], int]] = {}
    for i, (size, kind) in enumerate(zip(sizes, kinds)):
        if size < 0:
            raise ValueError(f"size of tensor {i} is negative ({size})")
        members, total = open_.get(kind, ([], 0))
        if members and total + size > cap_bytes:
            done.append(members)
            members, total = [], 0
        members = members + [i]
        total += size
        open_[kind] = (members, total)
    done.extend(members for members, _ in open_.values() if members)
    return sorted(done, key=lambda b: b[0])


def all_reduce_coalesced(
    backend: Any, tensors: Sequence[torch.Tensor], op: str = "sum", cap_bytes: int = 25 << 20
) -> int:
    """All-reduce ``tensors`` in place with one collective per bucket; returns the count."""
    buckets = assign_buckets(
        [t.numel() * t.element_size() for t in tensors],
        [(t.dtype, t.device) for t in tensors],
        cap_bytes,
    )
    for bucket in buckets:
        members = [tensors[i] for i in bucket]
        if len(members) == 1 and members[0].is_contiguous():
            backend.all_reduce(members[0], op)
            continue
        flat = torch.cat([t.reshape(-1) for t in members])
        backend.all_reduce(flat, op)
        offset = 0
        for t in members:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
    return len(buckets)


class Bucketer:
    """Queue tensors as they become ready; a full bucket is reduced at once.

    ``add`` returns the number of collectives it issued (0 while the bucket fills);
    ``flush`` reduces what is left. Tensors are reduced in place; a caller reads them only
    after the ``add``/``flush`` that issued their bucket.
    """

    def __init__(self, backend: Any, op: str = "sum", cap_bytes: int = 25 << 20) -> None:
        if cap_bytes <= 0:
            raise ValueError(f"cap_bytes must be positive, got {cap_bytes}")
        self.backend = backend
        self.op = op
        self.cap_bytes = cap_bytes
        self._pending: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], int]] = {}
        self.num_collectives = 0

    def add(self, tensor: torch.Tensor) -> int:
        key = (tensor.dtype, tensor.device)
        size = tensor.numel() * tensor.element_size()
        members, total = self._pending.get(key, ([], 0))
        issued = 0
        if members and total + size > self.cap_bytes:
            issued += all_reduce_coalesced(self.backend, members, self.op, self.cap_bytes)
            members, total = [], 0
        members.append(tensor)
        total += size
        self._pending[key] = (members, total)
        if total >= self.cap_bytes:
            issued += all_reduce_coalesced(self.backend, members, self.op, self.cap_bytes)
            del self._pending[key]
        self.num_collectives += issued
        return issued

    def flush(self) -> int:
        issued = 0
        for members, _ in self._pending.values():
            issued += all_reduce_coalesced(self.backend, members, self.op, self.cap_bytes)
        self._pending.clear()
        self.num_collectives += issued
        return issued
