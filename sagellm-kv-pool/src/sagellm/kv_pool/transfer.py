"""Block copies between raw block storages ``[num_layers, 2, num_blocks, ...]`` (uint8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["contiguous_runs", "copy_blocks_between", "id_runs", "use_slices"]

# Below this many bytes per run, one gather/scatter pair beats a Python loop of slice
# copies (a slice copy costs a few microseconds of dispatch; index_copy_ over a strided
# storage runs near 3 GB/s where a slice copy runs at memcpy speed).
_MIN_RUN_BYTES = 32 * 1024
_MAX_SMALL_RUNS = 16


def use_slices(num_runs: int, num_bytes: int) -> bool:
    """True when copying ``num_bytes`` as ``num_runs`` slice copies beats indexed copies."""
    return num_runs <= _MAX_SMALL_RUNS or num_bytes / num_runs >= _MIN_RUN_BYTES


def id_runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(position in block_ids, first id, length)`` for each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    start = first = length = 0
    for i, b in enumerate(block_ids):
        if length and b == first + length:
            length += 1
            continue
        if length:
            runs.append((start, first, length))
        start, first, length = i, b, 1
    if length:
        runs.append((start, first, length))
    return runs


def contiguous_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split paired ids into ``(src_start, dst_start, length)`` runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    s0 = d0 = length = 0
    for s, d in zip(src_ids, dst_ids):
        if length and s == s0 + length and d == d0 + length:
            length += 1
            continue
        if length:
            runs.append((s0, d0, length))
        s0, d0, length = s, d, 1
    if length:
        runs.append((s0, d0, length))
    return runs


def copy_blocks_between(
    src: torch.Tensor, dst: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int]
) -> None:
    """Copy block ``src_ids[i]`` of ``src`` to block ``dst_ids[i]`` of ``dst`` (dim 2).

    Every source is read before any destination is written, so the two id lists may
    overlap when ``src`` and ``dst`` are the same storage. Consecutive ids are copied as
    slices (one strided pass over the bytes, no temporary); scattered ids go through one
    ``index_select`` and one ``index_copy_`` covering all layers at once.
    """
    if not src_ids:
        return
    runs = contiguous_runs(src_ids, dst_ids)
    num_bytes = src[:, :, 0].numel() * src.element_size() * len(src_ids)
    overlap = src.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr() and not set(
        src_ids
    ).isdisjoint(dst_ids)
    if not overlap and use_slices(len(runs), num_bytes):
        for s0, d0, k in runs:
            dst[:, :, d0 : d0 + k].copy_(src[:, :, s0 : s0 + k])
        return
    src_index = torch.tensor(src_ids, dtype=torch.long, device=src.device)
    dst_index = torch.tensor(dst_ids, dtype=torch.long, device=dst.device)
    gathered = src.index_select(2, src_index)
    dst.index_copy_(2, dst_index, gathered.to(dst.device))
