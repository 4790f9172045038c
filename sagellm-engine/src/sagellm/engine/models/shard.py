"""Tensor-parallel sharding of a loaded Llama-family model (Megatron-LM's split).

Each of ``world`` ranks keeps ``1/world`` of every layer: the query and KV heads of its
slice (column-parallel ``qkv_proj``, so attention and the KV cache hold only those heads),
the matching input columns of ``o_proj`` (row-parallel), a slice of the MLP's width
(column-parallel ``gate_up_proj``, row-parallel ``down_proj``), and a slice of the
vocabulary for the embedding and the head. The two row-parallel projections end in an
all-reduce of their partial sums, the embedding in one of its masked lookups, and the
head in an all-gather of the vocabulary slices: two all-reduces per layer, as in
Megatron-LM and vLLM. Collectives go through a ``CommBackend`` (core protocol, group
``sagellm.comm_backend``).

Sharding happens before any quantizer, on the float weights and on the checkpoint's
quantized blocks alike (GGUF rows are independent, and an input slice that starts and
ends on a 32-column block boundary is a run of whole blocks in every row): a quantization
method then quantizes, or computes on the blocks of, each rank's own slices, so the split
composes with every method (gguf, int8, int4, gptq, awq, smoothquant).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sagellm.core.errors import ConfigError
from sagellm.core.types import PackedWeight
from sagellm.engine.layers.attention import Attention
from sagellm.engine.layers.embedding import LMHead, VocabEmbedding
from sagellm.engine.layers.linear import Linear
from sagellm.engine.models.config import ModelConfig

__all__ = [
    "ParallelLMHead",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "check_shardable",
    "shard_model",
    "slice_packed",
]

logger = logging.getLogger(__name__)

#: GGUF formats whose rows are runs of 32-column blocks (what an input slice may cut)
_BLOCKS_OF_32 = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def check_shardable(cfg: ModelConfig, world: int) -> None:
    """Raise ConfigError unless heads, KV heads and the MLP width split over ``world``."""
    if world < 1:
        raise ConfigError(f"tensor_parallel_size must be at least 1, got {world}")
    for what, n in (
        ("query heads", cfg.num_heads),
        ("KV heads", cfg.num_kv_heads),
        ("MLP width (intermediate_size)", cfg.intermediate_size),
    ):
        if n % world:
            raise ConfigError(
                f"tensor_parallel_size={world} does not divide the model's {n} {what}; "
                f"choose a size that divides {cfg.num_heads} query heads, "
                f"{cfg.num_kv_heads} KV heads and {cfg.intermediate_size}"
            )


def slice_packed(
    packed: PackedWeight | None,
    rows: Sequence[tuple[int, int]] = (),
    cols: tuple[int, int] | None = None,
    pad_rows: int = 0,
) -> PackedWeight | None:
    """The blocks of rows ``[a, b)`` for each range of ``rows`` (all rows when empty),
    stacked, then of input columns ``[c0, c1)``, then ``pad_rows`` zero rows (all-zero
    bytes decode to zero weights in every block format). None when ``packed`` is None or
    the columns do not cut whole 32-column blocks of a format made of them: the layer
    then computes on its float slice."""
    if packed is None:
        return None
    data = packed.data
    n, k = packed.shape
    if rows:
        data = torch.cat([data[a:b] for a, b in rows])
        n = sum(b - a for a, b in rows)
    if cols is not None and cols != (0, k):
        c0, c1 = cols
        if packed.format not in _BLOCKS_OF_32 or c0 % 32 or c1 % 32:
            return None
        per_block = data.shape[1] // (k // 32)
        data = data[:, c0 // 32 * per_block : c1 // 32 * per_block]
        k = c1 - c0
    if pad_rows:
        data = torch.cat([data, data.new_zeros(pad_rows, data.shape[1])])
        n += pad_rows
    return PackedWeight(packed.format, data.contiguous().clone(), (n, k))


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=False)


class RowParallelLinear(Linear):
    """A projection over a slice of its input whose partial outputs are summed over the
    ranks (an all-reduce after the method's product)."""

    def __init__(self, input_size: int, output_size: int, comm: Any) -> None:
        super().__init__(input_size, (output_size,))
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x).contiguous()
        self.comm.all_reduce(y)
        return y


class VocabParallelEmbedding(VocabEmbedding):
    """Rows ``[start, start + shard)`` of the table; ids outside give zeros, and an
    all-reduce over the ranks puts each id's row together."""

    def __init__(self, table: torch.Tensor, start: int, shard: int, comm: Any) -> None:
        vocab, hidden = table.shape
        super().__init__(shard, hidden)
        rows = torch.zeros(shard, hidden, dtype=table.dtype, device=table.device)
        end = min(start + shard, vocab)
        if end > start:
            rows[: end - start] = table[start:end]
        self.weight = nn.Parameter(rows, requires_grad=False)
        self.start, self.shard, self.comm = start, shard, comm

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.shard)
        out = super().forward(local.masked_fill(outside, 0))  # float rows or int8 blocks
        out.masked_fill_(outside.unsqueeze(-1), 0)
        self.comm.all_reduce(out)
        return out


class ParallelLMHead(LMHead):
    """Logits of this rank's vocabulary slice, all-gathered into the full vocabulary."""

    def __init__(
        self, vocab_size: int, hidden: int, shard: int, world: int, comm: Any, weight: Any
    ) -> None:
        super().__init__(shard, hidden, None)
        self.weight = weight
        self.vocab_size, self.world, self.comm = vocab_size, world, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.method.apply(self, x).float().contiguous()
        rows, shard = local.shape
        out = torch.empty(self.world * rows, shard, dtype=local.dtype, device=local.device)
        self.comm.all_gather(out, local)
        full = out.view(self.world, rows, shard).permute(1, 0, 2).reshape(rows, -1)
        return full[:, : self.vocab_size]


def _input_slice(proj: Linear, c0: int, c1: int) -> PackedWeight | None:
    """``proj``'s blocks of input columns ``[c0, c1)``; logs when they cannot be cut."""
    out = slice_packed(proj.packed, cols=(c0, c1))
    if proj.packed is not None and out is None:
        logger.info(
            "tensor parallelism: columns %d..%d of a %s projection do not cut whole blocks; "
            "this rank computes on its float slice",
            c0,
            c1,
            proj.packed.format,
        )
    return out


def _shard_layer(layer: Any, rank: int, world: int, comm: Any) -> None:
    d = layer.head_dim
    heads, kv_heads = layer.num_heads // world, layer.num_kv_heads // world
    q_full, kv_full = layer.q_size, layer.kv_size
    q0, k0 = rank * heads * d, rank * kv_heads * d
    hidden = layer.qkv_proj.input_size
    w = layer.qkv_proj.weight.data
    parts = [
        w[q0 : q0 + heads * d],
        w[q_full + k0 : q_full + k0 + kv_heads * d],
        w[q_full + kv_full + k0 : q_full + kv_full + k0 + kv_heads * d],
    ]
    qkv = Linear(
        hidden, (heads * d, kv_heads * d, kv_heads * d), bias=layer.qkv_proj.bias is not None
    )
    qkv.weight = _param(torch.cat(parts))
    qkv.packed = slice_packed(
        layer.qkv_proj.packed,
        rows=[
            (q0, q0 + heads * d),
            (q_full + k0, q_full + k0 + kv_heads * d),
            (q_full + kv_full + k0, q_full + kv_full + k0 + kv_heads * d),
        ],
    )
    if layer.qkv_proj.bias is not None:
        b = layer.qkv_proj.bias.data
        qkv.bias = _param(
            torch.cat(
                [
                    b[q0 : q0 + heads * d],
                    b[q_full + k0 : q_full + k0 + kv_heads * d],
                    b[q_full + kv_full + k0 : q_full + kv_full + k0 + kv_heads * d],
                ]
            )
        )
    o = RowParallelLinear(heads * d, layer.o_proj.output_size, comm)
    o.weight = _param(layer.o_proj.weight.data[:, q0 : q0 + heads * d])
    o.packed = _input_slice(layer.o_proj, q0, q0 + heads * d)
    inter_full = layer.gate_up_proj.output_sizes[0]
    inter = inter_full // world
    i0 = rank * inter
    gw = layer.gate_up_proj.weight.data
    gate_up = Linear(hidden, (inter, inter))
    gate_up.weight = _param(
        torch.cat([gw[i0 : i0 + inter], gw[inter_full + i0 : inter_full + i0 + inter]])
    )
    gate_up.packed = slice_packed(
        layer.gate_up_proj.packed,
        rows=[(i0, i0 + inter), (inter_full + i0, inter_full + i0 + inter)],
    )
    down = RowParallelLinear(inter, layer.down_proj.output_size, comm)
    down.weight = _param(layer.down_proj.weight.data[:, i0 : i0 + inter])
    down.packed = _input_slice(layer.down_proj, i0, i0 + inter)
    layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj = qkv, o, gate_up, down
    layer.num_heads, layer.num_kv_heads = heads, kv_heads
    layer.q_size, layer.kv_size = heads * d, kv_heads * d
    layer.attn = Attention(heads, kv_heads, d)


def shard_model(model: Any, rank: int, world: int, comm: Any) -> ModelConfig:
    """Keep rank ``rank``'s slice of ``model`` (a loaded float ``LlamaForCausalLM``) in
    place; returns the rank's config (heads, KV heads and MLP width divided by ``world``,
    the vocabulary whole, since the head's gathered logits cover all of it)."""
    cfg: ModelConfig = model.config
    check_shardable(cfg, world)
    vocab = cfg.vocab_size
    shard = -(-vocab // world)
    start = rank * shard
    with torch.no_grad():
        for layer in model.layers:
            _shard_layer(layer, rank, world, comm)
        table = model.embed_tokens.weight.data
        head_table = table if cfg.tie_word_embeddings else model.lm_head.weight.data
        end = min(start + shard, vocab)
        head_blocks = slice_packed(
            model.lm_head.packed,
            rows=[(start, end)] if end > start else [(0, 0)],
            pad_rows=shard - max(end - start, 0),
        )
        model.embed_tokens = VocabParallelEmbedding(table, start, shard, comm)
        if cfg.tie_word_embeddings:
            head_weight = model.embed_tokens.weight  # still one tensor, now a slice
        else:
            rows = torch.zeros(shard, cfg.hidden_size, dtype=head_table.dtype)
            if end > start:
                rows[: end - start] = head_table[start:end]
            head_weight = nn.Parameter(rows, requires_grad=False)
        model.lm_head = ParallelLMHead(vocab, cfg.hidden_size, shard, world, comm, head_weight)
        model.lm_head.packed = head_blocks
    local = dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // world,
        num_kv_heads=cfg.num_kv_heads // world,
        intermediate_size=cfg.intermediate_size // world,
    )
    model.config = local
    model.tensor_parallel = (rank, world)
    return local
