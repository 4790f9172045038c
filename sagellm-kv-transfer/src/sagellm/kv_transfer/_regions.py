"""Byte addresses of a pool's blocks, for the one-sided transports (Mooncake, NIXL)."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.protocols import KVPool
from sagellm.kv_transfer.plan import id_runs

__all__ = ["block_regions", "layer_bases", "runs_of"]


def layer_bases(pool: KVPool) -> list[tuple[int, int, int]]:
    """``(address, bytes, block stride)`` of every layer's key then value tensor."""
    out = []
    for layer in range(pool.schema.num_layers):
        for t in pool.layer_cache(layer):
            if not t.is_contiguous():
                raise ValueError(
                    f"layer {layer}'s KV tensor is not contiguous; one-sided transports "
                    "register whole tensors (use the torch channel for this pool)"
                )
            out.append((int(t.data_ptr()), int(t.numel() * t.element_size()), int(t[0].nbytes)))
    return out


def runs_of(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(src first, dst first, length)`` runs consecutive on both sides."""
    out: list[tuple[int, int, int]] = []
    for pos, first, n in id_runs(src_ids):
        for p0, d0, m in id_runs(dst_ids[pos : pos + n]):
            out.append((first + p0, d0, m))
    return out


def block_regions(
    src: list[tuple[int, int, int]],
    dst: list[tuple[int, int, int]],
    tensor: int,
    src_ids: Sequence[int],
    dst_ids: Sequence[int],
) -> tuple[list[int], list[int], list[int]]:
    """Source addresses, destination addresses and lengths of ``tensor``'s blocks."""
    s_base, _, stride = src[tensor]
    d_base, _, _ = dst[tensor]
    srcs, dsts, lens = [], [], []
    for s0, d0, n in runs_of(src_ids, dst_ids):
        srcs.append(s_base + s0 * stride)
        dsts.append(d_base + d0 * stride)
        lens.append(n * stride)
    return srcs, dsts, lens
