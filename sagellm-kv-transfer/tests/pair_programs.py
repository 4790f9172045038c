"""Programs the two-process tests run on each side (importable by name)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from sagellm.core.testing.kv_transfer import block_values


def fill(pool: Any, request: str, ids: list[int]) -> None:
    for layer in range(pool.schema.num_layers):
        kv = pool.layer_cache(layer)
        for j in range(2):
            for pos, b in enumerate(ids):
                kv[j][b] = block_values(pool.schema, request, layer, j, pos)


def offer_and_wait(channel: Any, pool: Any, link: Any, n: int, limit_s: float) -> dict[str, Any]:
    """Offer one request of ``n`` blocks; wait until the channel releases it."""
    ids = pool.allocate(n)
    fill(pool, "big", ids)
    _, plan = channel.request_finished("big", ids)
    link.put(plan)
    start = time.monotonic()
    released = None
    while time.monotonic() - start < limit_s:
        if "big" in channel.get_finished()[0]:
            released = time.monotonic() - start
            break
        time.sleep(0.02)
    return {"released_s": released, "free": pool.num_free_blocks, "stats": channel.make_stats()}


def load_then_die(channel: Any, pool: Any, link: Any, n: int, limit_s: float) -> None:
    """Start loading, and end the process once the first layer is in."""
    plan = link.get(30)
    channel.add_remote_request(plan)
    load = channel.update_state_after_alloc("big", pool.allocate(n), plan.num_tokens)
    channel.start_load(load)
    channel.wait_for_layer(load, 0)
    os._exit(17)


def offer_then_die(channel: Any, pool: Any, link: Any, n: int, limit_s: float) -> None:
    """Offer a request, and end the process once the consumer started its load."""
    ids = pool.allocate(n)
    _, plan = channel.request_finished("big", ids)
    link.put(plan)
    link.get(30)
    os._exit(17)


def load_expecting_error(channel: Any, pool: Any, link: Any, n: int, limit_s: float) -> Any:
    from sagellm.kv_transfer.errors import KVTransferError

    plan = link.get(30)
    channel.add_remote_request(plan)
    load = channel.update_state_after_alloc("big", pool.allocate(n), plan.num_tokens)
    channel.start_load(load)
    link.put("started")
    start = time.monotonic()
    try:
        channel.wait(load)
    except KVTransferError as exc:
        return ("KVTransferError", str(exc), time.monotonic() - start)
    except Exception as exc:  # reported, and the test fails on the type
        return (type(exc).__name__, str(exc), time.monotonic() - start)
    return None


def compressed_load(channel: Any, pool: Any, link: Any, n: int, limit_s: float) -> dict[str, Any]:
    """Load the producer's request; return what arrived and what was sent."""
    plan = link.get(30)
    channel.add_remote_request(plan)
    dst = pool.allocate(n)
    load = channel.update_state_after_alloc("big", dst, plan.num_tokens)
    channel.start_load(load)
    channel.wait(load)
    got = [torch.stack([pool.layer_cache(la)[j][dst] for j in range(2)]) for la in range(2)]
    return {"got": got, "stats": channel.make_stats()}


def offer_scattered(channel: Any, pool: Any, link: Any, n: int, limit_s: float) -> Any:
    """Offer ``n`` blocks whose ids are not consecutive (every other block, reversed)."""
    held = pool.allocate(2 * n)
    ids = held[::2][::-1]
    fill(pool, "big", ids)
    _, plan = channel.request_finished("big", ids)
    link.put(plan)
    link.get(limit_s)  # the consumer has its blocks
    return ids


def load_scattered(channel: Any, pool: Any, link: Any, n: int, limit_s: float) -> Any:
    """Load into destination blocks that are partly consecutive, partly not; return what
    arrived, in the request's block order."""
    plan = link.get(30)
    channel.add_remote_request(plan)
    held = pool.allocate(2 * n)
    dst = held[:2] + held[3::2][: n - 2]  # a run of two, then every other block
    load = channel.update_state_after_alloc("big", dst, plan.num_tokens)
    channel.start_load(load)
    channel.wait(load)
    link.put("done")
    layers = pool.schema.num_layers
    return [[pool.layer_cache(la)[j][dst].clone() for j in range(2)] for la in range(layers)]
