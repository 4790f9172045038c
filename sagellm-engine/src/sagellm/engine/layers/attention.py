"""Grouped-query attention over a paged KV cache.

New keys and values are written into their slots of the pool's blocks first; then

* decode rows (one new token each) attend in one padded call: the slots of their
  positions are gathered into ``[B, max_len]`` (padding repeats a slot of the same
  sequence, so only written values are ever read: a pool's fresh blocks may hold any bit
  pattern, NaN included, and a masked NaN still poisons the result), the padding is
  masked out, and the query heads of one KV head are laid out as that head's query
  "length" so no head expansion is needed;
* each multi-token chunk (prefill, or a continuation after a cached prefix) attends to its
  cached prefix and causally to itself.

Everything that depends only on the plan (slot mapping, block tables, masks) is built
once per step in :class:`AttentionMetadata` and shared by all layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Attention", "AttentionMetadata", "ChunkMetadata"]


@dataclass
class ChunkMetadata:
    """One multi-token chunk of the flattened batch."""

    start: int  # first row of the chunk in the flattened tokens
    end: int  # one past its last row
    slots: torch.Tensor | None  # [context_len] slots of prefix + chunk; None when no prefix
    context_len: int  # positions attended by the chunk's last token
    mask: torch.Tensor | None  # additive [n, context_len] mask; None: plain causal


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] flat slot (block * block_size + offset) of each token
    num_decodes: int = 0  # rows 0..num_decodes-1 are single-token chunks
    decode_slots: torch.Tensor | None = None  # [B * max_len] slots of every position, padded
    decode_mask: torch.Tensor | None = None  # additive [B, 1, 1, max_len]
    # with a paged decode kernel instead of the two above: int32 block tables [B, width]
    # (padded with the row's first block) and context lengths [B]
    decode_block_tables: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    chunks: list[ChunkMetadata] = field(default_factory=list)


class Attention(nn.Module):
    """Paged grouped-query attention of one layer (no weights: projections live outside)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5
        # a kernel provider's paged decode attention (q, k_cache, v_cache, block_tables,
        # context_lens, scale) -> out, reading the pool's blocks in place; None: gather
        self.decode_kernel: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """``q`` ``[T, H, D]``, ``k``/``v`` ``[T, Hkv, D]``; caches ``[blocks, bs, Hkv, D]``.

        Returns ``[T, H * D]``.
        """
        num_tokens = q.shape[0]
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        k_flat = k_cache.view(-1, hkv, d)
        v_flat = v_cache.view(-1, hkv, d)
        k_flat.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_flat.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

        out = q.new_empty(num_tokens, h, d)
        b = meta.num_decodes
        if b and meta.decode_block_tables is not None:
            assert self.decode_kernel is not None and meta.decode_context_lens is not None
            out[:b] = self.decode_kernel(
                q[:b].contiguous(),
                k_cache,
                v_cache,
                meta.decode_block_tables,
                meta.decode_context_lens,
                self.scale,
            )
        elif b:
            assert meta.decode_slots is not None and meta.decode_mask is not None
            length = meta.decode_mask.shape[-1]
            kb = k_flat.index_select(0, meta.decode_slots).view(b, length, hkv, d)
            vb = v_flat.index_select(0, meta.decode_slots).view(b, length, hkv, d)
            if kb.dtype != q.dtype:
                kb, vb = kb.to(q.dtype), vb.to(q.dtype)
            # the group's query heads play the role of query positions of their KV head
            qd = q[:b].view(b, hkv, self.group, d)
            o = F.scaled_dot_product_attention(
                qd,
                kb.transpose(1, 2),
                vb.transpose(1, 2),
                attn_mask=meta.decode_mask,
                scale=self.scale,
            )
            out[:b] = o.reshape(b, h, d)
        for c in meta.chunks:
            qc = q[c.start : c.end].transpose(0, 1).unsqueeze(0)
            if c.slots is None:
                kc, vc = k[c.start : c.end], v[c.start : c.end]
            else:
                kc = k_flat.index_select(0, c.slots)
                vc = v_flat.index_select(0, c.slots)
                if kc.dtype != q.dtype:
                    kc, vc = kc.to(q.dtype), vc.to(q.dtype)
            o = F.scaled_dot_product_attention(
                qc,
                kc.transpose(0, 1).unsqueeze(0),
                vc.transpose(0, 1).unsqueeze(0),
                attn_mask=c.mask,
                is_causal=c.mask is None,
                scale=self.scale,
                enable_gqa=self.group > 1,
            )
            out[c.start : c.end] = o[0].transpose(0, 1)
        return out.view(num_tokens, h * d)
