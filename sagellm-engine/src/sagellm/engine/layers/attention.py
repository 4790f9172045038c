"""Grouped-query attention over a paged KV cache.

New keys and values are written into their slots of the pool's blocks first; then

* decode rows (one new token each) attend in one padded call: the slots of their
  positions are gathered into ``[B, max_len]`` (padding repeats a slot of the same
  sequence, so only written values are ever read: a pool's fresh blocks may hold any bit
  pattern, NaN included, and a masked NaN still poisons the result), the padding is
  masked out, and the query heads of one KV head are laid out as that head's query
  "length" so no head expansion is needed;
* each multi-token chunk (prefill, or a continuation after a cached prefix) attends to its
  cached prefix and causally to itself, through a kernel provider's flash kernel where
  one is installed (:attr:`Attention.prefill_kernel`), else through SDPA.

Everything that depends only on the plan (slot mapping, block tables, masks) is built
once per step in :class:`AttentionMetadata` and shared by all layers.

A quantized cache (int8 / float8 rows ending in their float16 scale, last dimension
``head_dim + 2``; see :mod:`.kv_quant`) is written by quantizing each new token-head row
and read by dequantizing what was gathered, before SDPA (which refuses float8). A chunk
attends to the dequantized form of its own new keys and values too, so its result does
not depend on whether a prefix came from the cache or was computed in the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from sagellm.engine.layers.kv_quant import SCALE_ELEMENTS, dequantize_rows, quantize_rows

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
    positions: torch.Tensor | None = None  # [T] int64 position of each token
    num_decodes: int = 0  # rows 0..num_decodes-1 attend as decodes (one position each)
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
        # a kernel provider's causal chunk attention (q [n, H, D], k, v [ctx, Hkv, D],
        # out [n, H, D], start, scale) writing into out; None: SDPA with a mask
        self.prefill_kernel: Callable[..., None] | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:
        """``q`` ``[T, H, D]``, ``k``/``v`` ``[T, Hkv, D]``; caches ``[blocks, bs, Hkv, D]``.

        ``kv_written``: a fused kernel has already written ``k`` and ``v`` into their
        slots. A quantized cache is ``[blocks, bs, Hkv, D + 2]`` of int8 or float8 (see
        :meth:`_forward_quantized`). Returns ``[T, H * D]``.
        """
        if k_cache.shape[-1] != self.head_dim:
            return self._forward_quantized(q, k, v, k_cache, v_cache, meta, kv_written)
        num_tokens = q.shape[0]
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        k_flat = k_cache.view(-1, hkv, d)
        v_flat = v_cache.view(-1, hkv, d)
        if not kv_written:
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
            if c.slots is None:
                kc, vc = k[c.start : c.end], v[c.start : c.end]
            else:
                kc = k_flat.index_select(0, c.slots)
                vc = v_flat.index_select(0, c.slots)
                if kc.dtype != q.dtype:
                    kc, vc = kc.to(q.dtype), vc.to(q.dtype)
            if self.prefill_kernel is not None:
                self._chunk_kernel(q, kc, vc, out, c)
                continue
            qc = q[c.start : c.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qc,
                kc.transpose(0, 1).unsqueeze(0),
                vc.transpose(0, 1).unsqueeze(0),
                attn_mask=c.mask,
                is_causal=c.mask is None,
                scale=self.scale,
                enable_gqa=self.group > 1,
            )
            rows = o[0].transpose(0, 1)
            # one chunk and nothing else: CPU flash attention's output is [n, H, D] already
            whole = not b and len(meta.chunks) == 1 and rows.shape[0] == num_tokens
            if whole and rows.is_contiguous():
                return rows.view(num_tokens, h * d)
            out[c.start : c.end] = rows
        return out.view(num_tokens, h * d)

    def _forward_quantized(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:
        """:meth:`forward` over int8 / float8 caches whose rows end in their scale.

        ``kv_written``: a fused kernel has already quantized ``k`` and ``v`` into their
        slots (the same rows :func:`.kv_quant.quantize_rows` makes).
        """
        num_tokens = q.shape[0]
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        row = d + SCALE_ELEMENTS
        assert k_cache.shape[-1] == row, f"cache rows of {k_cache.shape[-1]}, expected {row}"
        k_flat = k_cache.view(-1, hkv, row)
        v_flat = v_cache.view(-1, hkv, row)
        kq: torch.Tensor | None = None
        vq: torch.Tensor | None = None
        if not kv_written:
            kq = quantize_rows(k, k_cache.dtype)
            vq = quantize_rows(v, v_cache.dtype)
            # through a byte view: index_copy_ has no float8 kernel on the CPU
            k_flat.view(torch.int8).index_copy_(0, meta.slot_mapping, kq.view(torch.int8))
            v_flat.view(torch.int8).index_copy_(0, meta.slot_mapping, vq.view(torch.int8))

        out = q.new_empty(num_tokens, h, d)
        b = meta.num_decodes
        if b and meta.decode_block_tables is not None:
            # the runtime hands decodes to the kernel only for cache types it reads
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
            kb = dequantize_rows(k_flat.index_select(0, meta.decode_slots), d, q.dtype)
            vb = dequantize_rows(v_flat.index_select(0, meta.decode_slots), d, q.dtype)
            qd = q[:b].view(b, hkv, self.group, d)
            o = F.scaled_dot_product_attention(
                qd,
                kb.view(b, length, hkv, d).transpose(1, 2),
                vb.view(b, length, hkv, d).transpose(1, 2),
                attn_mask=meta.decode_mask,
                scale=self.scale,
            )
            out[:b] = o.reshape(b, h, d)
        for c in meta.chunks:
            if c.slots is None:
                if kq is None or vq is None:  # written by the fused kernel: read them back
                    own = meta.slot_mapping[c.start : c.end]
                    kc = dequantize_rows(k_flat.index_select(0, own), d, q.dtype)
                    vc = dequantize_rows(v_flat.index_select(0, own), d, q.dtype)
                else:
                    kc = dequantize_rows(kq[c.start : c.end], d, q.dtype)
                    vc = dequantize_rows(vq[c.start : c.end], d, q.dtype)
            else:
                kc = dequantize_rows(k_flat.index_select(0, c.slots), d, q.dtype)
                vc = dequantize_rows(v_flat.index_select(0, c.slots), d, q.dtype)
            if self.prefill_kernel is not None:
                self._chunk_kernel(q, kc, vc, out, c)
                continue
            qc = q[c.start : c.end].transpose(0, 1).unsqueeze(0)
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

    def _chunk_kernel(
        self,
        q: torch.Tensor,
        kc: torch.Tensor,
        vc: torch.Tensor,
        out: torch.Tensor,
        c: ChunkMetadata,
    ) -> None:
        """One chunk through :attr:`prefill_kernel`: causal after its cached prefix (the
        kernel derives what ``c.mask`` spells out from ``start``), written into ``out``."""
        assert self.prefill_kernel is not None
        n = c.end - c.start
        self.prefill_kernel(
            _rows(q[c.start : c.end]),
            _rows(kc),
            _rows(vc),
            out[c.start : c.end],
            c.context_len - n,
            self.scale,
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[n, heads, D]`` with its last two dims contiguous (any row stride)."""
    if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]:
        return t
    return t.contiguous()
