"""StepBatch: one execution plan flattened into tensors, built once per step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sagellm.core.types import SequenceChunk
from sagellm.engine.layers.attention import AttentionMetadata, ChunkMetadata

__all__ = ["StepBatch", "build_step_batch", "is_decode_chunk"]


def is_decode_chunk(chunk: SequenceChunk) -> bool:
    """Whether the chunk's rows run as decode rows: one token, or a chunk that samples
    every position (a decode verifying its drafts). Each of its tokens then attends like
    a decode of its own (block table, context up to its position) after the step's KV is
    written, so a verification step is a decode step of ``k + 1`` rows per request (the
    fused decode step and the paged decode kernel take it) instead of a prefill chunk."""
    n = len(chunk.token_ids)
    return n == 1 or (chunk.sample and chunk.num_logits == n)


@dataclass
class StepBatch:
    """Inputs of one forward pass.

    Decode rows come first (rows ``0..num_decodes-1``: single-token chunks, and every
    token of a chunk that samples each of its positions, see :func:`is_decode_chunk`) so
    attention batches them with one padded call; multi-token chunks follow in plan order.
    """

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logit_rows: torch.Tensor  # [R] rows whose logits are returned, in plan order
    request_ids: tuple[str, ...]  # owner of each returned row


def _check(chunk: SequenceChunk, block_size: int, num_blocks: int, max_len: int) -> None:
    n = len(chunk.token_ids)
    if n == 0:
        raise ValueError(f"chunk of request {chunk.request_id!r} has no tokens")
    end = chunk.start_position + n
    if chunk.start_position < 0:
        raise ValueError(f"request {chunk.request_id!r}: negative start_position")
    if end > max_len:
        raise ValueError(
            f"request {chunk.request_id!r} reaches position {end}, beyond max_model_len="
            f"{max_len}; shorten the prompt or raise max_model_len"
        )
    if len(chunk.block_ids) * block_size < end:
        raise ValueError(
            f"request {chunk.request_id!r}: {len(chunk.block_ids)} blocks of {block_size} "
            f"tokens cannot hold {end} positions; allocate blocks before executing"
        )
    used = chunk.block_ids[: -(-end // block_size)]
    if used and (min(used) < 0 or max(used) >= num_blocks):
        raise ValueError(
            f"request {chunk.request_id!r}: block ids {list(used)} outside the pool's "
            f"0..{num_blocks - 1}"
        )


def build_step_batch(
    chunks: Sequence[SequenceChunk],
    *,
    block_size: int,
    num_blocks: int,
    max_model_len: int,
    mask_dtype: torch.dtype,
    device: torch.device,
    paged_decode: bool = False,
) -> StepBatch:
    """Flatten ``chunks`` (in plan order) into a :class:`StepBatch`.

    ``paged_decode``: describe the decodes by block tables and context lengths (for a
    paged decode kernel) instead of gathered slots and a mask.
    """
    for c in chunks:
        _check(c, block_size, num_blocks, max_model_len)
    decodes = [i for i, c in enumerate(chunks) if is_decode_chunk(c)]
    multis = [i for i, c in enumerate(chunks) if not is_decode_chunk(c)]
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    last_row: dict[int, int] = {}

    # decode rows: one token each, padded block tables
    tables: list[list[int]] = []
    ctx_lens: list[int] = []
    for i in decodes:
        c = chunks[i]
        for j, tok in enumerate(c.token_ids):
            pos = c.start_position + j
            tokens.append(tok)
            positions.append(pos)
            slots.append(c.block_ids[pos // block_size] * block_size + pos % block_size)
            nblk = pos // block_size + 1
            tables.append(list(c.block_ids[:nblk]))
            ctx_lens.append(pos + 1)
        last_row[i] = len(tokens) - 1
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
    if decodes and paged_decode:
        width = max(len(t) for t in tables)
        flat = [b for t in tables for b in (t + [t[0]] * (width - len(t)))]
        meta.num_decodes = len(tables)
        meta.decode_block_tables = torch.tensor(flat, dtype=torch.int32, device=device).view(
            len(tables), width
        )
        meta.decode_context_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    elif decodes:
        width = max(len(t) for t in tables)
        flat = [b for t in tables for b in (t + [t[0]] * (width - len(t)))]
        table = torch.tensor(flat, dtype=torch.long, device=device).view(len(tables), width)
        lens = torch.tensor(ctx_lens, dtype=torch.long, device=device).unsqueeze(1)
        offsets = torch.arange(block_size, device=device)
        slot_grid = (table.unsqueeze(2) * block_size + offsets).view(len(tables), -1)
        length = int(max(ctx_lens))
        slot_grid = slot_grid[:, :length]
        allowed = torch.arange(length, device=device).unsqueeze(0) < lens
        # padding reads the sequence's own first slot: written, hence finite
        slot_grid = torch.where(allowed, slot_grid, slot_grid[:, :1])
        mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=device)
        mask.masked_fill_(~allowed, float("-inf"))
        meta.num_decodes = len(tables)
        meta.decode_slots = slot_grid.reshape(-1)
        meta.decode_mask = mask.view(len(tables), 1, 1, length)

    for i in multis:
        c = chunks[i]
        n = len(c.token_ids)
        start = c.start_position
        row = len(tokens)
        tokens.extend(c.token_ids)
        positions.extend(range(start, start + n))
        block_ids = c.block_ids
        ctx = start + n
        chunk_slots = [block_ids[p // block_size] * block_size + p % block_size for p in range(ctx)]
        slots.extend(chunk_slots[start:])
        if start == 0:
            meta.chunks.append(ChunkMetadata(row, row + n, None, ctx, None))
        else:
            ids = torch.tensor(chunk_slots, dtype=torch.long, device=device)
            q_pos = torch.arange(start, ctx, device=device).unsqueeze(1)
            allowed = torch.arange(ctx, device=device).unsqueeze(0) <= q_pos
            mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=device)
            mask.masked_fill_(~allowed, float("-inf"))
            meta.chunks.append(ChunkMetadata(row, row + n, ids, ctx, mask))
        last_row[i] = row + n - 1

    meta.slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
    position_ids = torch.tensor(positions, dtype=torch.long, device=device)
    meta.positions = position_ids
    # A chunk verifying k drafts returns its last k + 1 rows (one per verified position).
    rows: list[int] = []
    owners: list[str] = []
    for i, c in enumerate(chunks):
        if not c.sample:
            continue
        m = c.num_logits
        if not 1 <= m <= len(c.token_ids):
            raise ValueError(
                f"request {c.request_id!r} asks for {m} logit rows from a chunk of "
                f"{len(c.token_ids)} tokens; num_logits must lie in 1..len(token_ids)"
            )
        rows.extend(range(last_row[i] - m + 1, last_row[i] + 1))
        owners.extend([c.request_id] * m)
    return StepBatch(
        token_ids=torch.tensor(tokens, dtype=torch.long, device=device),
        positions=position_ids,
        meta=meta,
        logit_rows=torch.tensor(rows, dtype=torch.long, device=device),
        request_ids=tuple(owners),
    )
