"""Bandwidth of the torch channel against raw gloo and a memcpy ceiling, in one run.

``python -m sagellm.kv_transfer.bench [--blocks 64 --layers 8 --reps 9 --chunk 8]``

Two processes (a producer and a consumer on the same host, one torch thread each). Per
repetition, interleaved: (A) the consumer loads a plan of ``--blocks`` blocks through
the channel (control round trip, chunked, pipelined, written into the pool); (B) the
same number of bytes as one flat tensor by raw ``send``/``recv`` on the channel's own
gloo group (the anchor: what gloo moves with no KV layout); (C) one ``copy_`` of those
bytes in the consumer (the host's memcpy ceiling). Reports medians and the ratio of
medians A/B as bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from typing import Any

import torch

from sagellm.core.types import KVCacheSchema, TransferPlan
from sagellm.kv_transfer.launch import run_pair

__all__ = ["main", "measure"]

_RAW_TAG = 1 << 20


def _producer(channel: Any, pool: Any, link: Any, num_blocks: int, reps: int) -> None:
    ids = pool.allocate(num_blocks)
    for layer in range(pool.schema.num_layers):
        for t in pool.layer_cache(layer):
            t.normal_()
    flat = torch.randn(num_blocks * pool.schema.bytes_per_block // 4)
    link.put(tuple(ids))
    while True:
        msg = link.get(120)
        if msg == "end":
            return
        if msg == "raw":
            channel._pg.send([flat], 1, _RAW_TAG).wait()
        else:  # offer the next repetition's plan
            channel.send(msg, pool)
            link.put("offered")


def _consumer(channel: Any, pool: Any, link: Any, num_blocks: int, reps: int) -> dict[str, Any]:
    src = link.get(120)
    dst = pool.allocate(num_blocks)
    nbytes = num_blocks * pool.schema.bytes_per_block
    flat = torch.empty(nbytes // 4)
    copy_src = torch.randn(nbytes // 4)
    times: dict[str, list[float]] = {"channel": [], "raw_gloo": [], "memcpy": []}
    for rep in range(reps + 1):  # the first repetition warms up and is dropped
        plan = TransferPlan("producer", "consumer", src, nbytes, tuple(dst), f"rep{rep}")
        link.put(dataclasses.replace(plan, dst_block_ids=()))
        link.get(60)
        t0 = time.perf_counter()
        channel.receive(plan, pool)
        channel.wait(plan)
        t_channel = time.perf_counter() - t0
        work = channel._pg.recv([flat], 0, _RAW_TAG)
        t0 = time.perf_counter()
        link.put("raw")
        work.wait()
        t_raw = time.perf_counter() - t0
        t0 = time.perf_counter()
        flat.copy_(copy_src)
        t_copy = time.perf_counter() - t0
        if rep:
            times["channel"].append(t_channel)
            times["raw_gloo"].append(t_raw)
            times["memcpy"].append(t_copy)
    link.put("end")
    return {"bytes": nbytes, "times": times}


def measure(
    num_blocks: int = 64,
    num_layers: int = 8,
    reps: int = 9,
    chunk_blocks: int = 8,
    pipeline: bool = True,
    compression: str = "none",
) -> dict[str, Any]:
    """Run the comparison; figures in seconds, GB/s and ratios."""
    schema = KVCacheSchema(num_layers=num_layers, num_kv_heads=8, head_dim=128, block_size=16)
    _, c = run_pair(
        _producer,
        _consumer,
        num_blocks,
        reps,
        schema=schema,
        num_blocks=num_blocks,
        options={
            "chunk_blocks": chunk_blocks,
            "pipeline": pipeline,
            "compression": compression,
            "timeout_s": 120.0,
        },
        timeout_s=600,
    )
    res = c.value
    med = {k: statistics.median(v) for k, v in res["times"].items()}
    gbs = {k: res["bytes"] / v / 1e9 for k, v in med.items()}
    return {
        "bytes": res["bytes"],
        "reps": reps,
        "chunk_blocks": chunk_blocks,
        "pipeline": pipeline,
        "compression": compression,
        "median_s": med,
        "GB/s": gbs,
        "channel_vs_raw_gloo": med["raw_gloo"] / med["channel"],
        "channel_vs_memcpy": med["memcpy"] / med["channel"],
        "loadavg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: print the figures as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--no-pipeline", action="store_true")
    ap.add_argument("--compression", choices=["none", "int8"], default="none")
    args = ap.parse_args(argv)
    out = measure(
        args.blocks, args.layers, args.reps, args.chunk, not args.no_pipeline, args.compression
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
