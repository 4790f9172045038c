"""Plan arithmetic: which blocks a consumer loads, how a load is cut into messages.

Pure functions over ids and counts (no torch), shared by every channel and checked by
property tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sagellm.core.types import DTYPE_BYTES, KVCacheSchema, TransferPlan

__all__ = [
    "Message",
    "id_runs",
    "load_plan",
    "matched_tokens",
    "message_bytes",
    "messages",
    "offer_tokens",
    "wire_bytes",
]


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a load: keys and values of ``src_ids`` of one layer."""

    index: int  # position in the load, from 0
    layer: int  # layer the blocks belong to
    src_ids: tuple[int, ...]  # blocks read on the producer
    dst_ids: tuple[int, ...]  # where they go on the consumer (same length)
    last_of_layer: bool  # True for the layer's final message


def offer_tokens(plan: TransferPlan, block_size: int) -> int:
    """Token positions an offered plan holds (``num_tokens``, or every position)."""
    return plan.num_tokens or len(plan.block_ids) * block_size


def matched_tokens(plan: TransferPlan, block_size: int, num_computed_tokens: int) -> int:
    """Tokens past ``num_computed_tokens`` a consumer can load from ``plan``.

    Loads start at a block boundary, so a ``num_computed_tokens`` inside a block (the
    consumer computed part of a block itself) matches nothing.
    """
    if num_computed_tokens < 0:
        raise ValueError(f"num_computed_tokens must be >= 0, got {num_computed_tokens}")
    total = offer_tokens(plan, block_size)
    if num_computed_tokens % block_size or num_computed_tokens >= total:
        return 0
    return total - num_computed_tokens


def load_plan(
    offer: TransferPlan,
    block_size: int,
    dst_block_ids: Sequence[int],
    num_external_tokens: int,
    target: str,
    bytes_per_block: int,
) -> TransferPlan:
    """The plan that loads the last ``num_external_tokens`` of ``offer`` into ``dst_block_ids``.

    The tokens are the tail of the offer (the consumer already holds the head); one
    destination block per source block. Raises ValueError on a mismatch.
    """
    total = offer_tokens(offer, block_size)
    if not 0 < num_external_tokens <= total:
        raise ValueError(
            f"num_external_tokens={num_external_tokens} for request {offer.request_id!r}: "
            f"the producer holds {total} tokens; ask get_num_matched_tokens first"
        )
    start_token = total - num_external_tokens
    if start_token % block_size:
        raise ValueError(
            f"request {offer.request_id!r}: loading {num_external_tokens} of {total} tokens "
            f"starts at token {start_token}, inside a block of {block_size}; load whole blocks"
        )
    first = start_token // block_size
    src = offer.block_ids[first:]
    if len(dst_block_ids) != len(src):
        raise ValueError(
            f"request {offer.request_id!r}: {num_external_tokens} tokens fill {len(src)} "
            f"block(s) of {block_size}, got {len(dst_block_ids)} destination block(s)"
        )
    return TransferPlan(
        source=offer.source,
        target=target,
        block_ids=tuple(src),
        total_bytes=len(src) * bytes_per_block,
        dst_block_ids=tuple(int(b) for b in dst_block_ids),
        request_id=offer.request_id,
        num_tokens=num_external_tokens,
    )


def messages(
    num_layers: int, src_ids: Sequence[int], dst_ids: Sequence[int], chunk_blocks: int
) -> list[Message]:
    """A load cut into messages: layer by layer, ``chunk_blocks`` blocks at most each.

    Layer-major order is what lets the consumer use layer ``l`` while ``l + 1`` is in
    flight. An empty id list gives no message.
    """
    if chunk_blocks < 1:
        raise ValueError(f"chunk_blocks must be >= 1, got {chunk_blocks}")
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source block(s) but {len(dst_ids)} destination block(s)")
    out: list[Message] = []
    src, dst = tuple(src_ids), tuple(dst_ids)
    for layer in range(num_layers):
        for start in range(0, len(src), chunk_blocks):
            end = min(start + chunk_blocks, len(src))
            out.append(Message(len(out), layer, src[start:end], dst[start:end], end == len(src)))
    return out


def message_bytes(schema: KVCacheSchema, num_blocks: int, compression: str = "none") -> int:
    """Bytes on the wire of one message of ``num_blocks`` blocks (keys and values).

    ``int8``: one byte per value plus a float32 scale per block, head and K/V.
    """
    rows = 2 * num_blocks * schema.block_size * schema.num_kv_heads
    if compression == "none":
        return rows * schema.head_size * DTYPE_BYTES[schema.dtype]
    if compression == "int8":
        return rows * schema.head_dim + 2 * num_blocks * schema.num_kv_heads * 4
    raise ValueError(f"unknown compression {compression!r}; use 'none' or 'int8'")


def wire_bytes(
    schema: KVCacheSchema, num_blocks: int, chunk_blocks: int, compression: str = "none"
) -> int:
    """Bytes on the wire of a whole load of ``num_blocks`` blocks."""
    full, rest = divmod(num_blocks, chunk_blocks)
    per_layer = full * message_bytes(schema, chunk_blocks, compression)
    if rest:
        per_layer += message_bytes(schema, rest, compression)
    return schema.num_layers * per_layer


def id_runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(position, first id, length)`` of each run of consecutive ids, in order."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(ids):
        if runs and b == runs[-1][1] + runs[-1][2]:
            pos, first, n = runs[-1]
            runs[-1] = (pos, first, n + 1)
        else:
            runs.append((i, b, 1))
    return runs
