"""Migration bandwidth of TieredKVStore against raw copies of the same bytes, same run.

Run ``python -m sagellm.kv_pool.bench_tiers [--blocks 64] [--repeats 7]``.

The schema is SmolLM2-135M's KV cache (30 layers, 3 KV heads, head dim 64, 16 tokens per
block, bfloat16: 360 KiB per block). Each measurement moves ``blocks`` blocks and is
repeated; the median is reported. Baselines, interleaved with the moves they compare to:

- memory tiers (device -> host, host -> device): ``dst.copy_(src)`` of one contiguous
  tensor of the same number of bytes (a raw memcpy);
- disk tier (host -> disk, disk -> device): one ``os.pwrite`` / ``os.preadv`` of a
  contiguous buffer of the same bytes to / from a file in the same directory.

Before every timed operation (store move or baseline) a 64 MiB scratch buffer is written,
so each starts with its data out of the CPU caches: otherwise a move right after the
move that wrote its source would read from cache while the baseline reads from DRAM.
Ratios are ``store bandwidth / raw bandwidth`` (1.0: as fast as the raw copy). On a
machine without a GPU the device tier is CPU memory too. Disk figures are page-cache
bandwidth (no fsync), for the store and for the raw baseline alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from sagellm.core.types import KVCacheSchema
from sagellm.kv_pool.config import DiskTierConfig, PagedKVPoolConfig, TieredKVStoreConfig
from sagellm.kv_pool.tiered import TieredKVStore

__all__ = ["SCHEMA", "measure", "main"]

SCHEMA = KVCacheSchema(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="bfloat16")


_FLUSH_BYTES = 64 * 1024 * 1024  # larger than the last-level cache of common CPUs


def _median_gbps(samples: list[float]) -> float:
    return statistics.median(samples)


def measure(
    num_blocks: int = 64, repeats: int = 7, directory: str | None = None
) -> dict[str, float]:
    """Bandwidths (GB/s) of each move and its raw baseline, and their ratios."""
    capacity = 2 * num_blocks
    config = TieredKVStoreConfig(
        device=PagedKVPoolConfig(num_blocks=capacity),
        host=PagedKVPoolConfig(num_blocks=capacity),
        disk=DiskTierConfig(num_blocks=capacity, directory=directory),
    )
    nbytes = num_blocks * SCHEMA.bytes_per_block
    out: dict[str, list[float]] = {
        k: []
        for k in (
            "device_to_host",
            "host_to_device",
            "host_to_disk",
            "disk_to_device",
            "raw_memcpy",
            "raw_file_write",
            "raw_file_read",
        )
    }
    with (
        TieredKVStore(config, schema=SCHEMA, device="cpu") as store,
        tempfile.TemporaryDirectory(dir=directory) as tmp,
    ):
        for tier in ("device", "host"):
            store.tier(tier).storage.view(torch.uint8).fill_(1)  # type: ignore[attr-defined]
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.zeros(nbytes, dtype=torch.uint8)
        raw_path = os.path.join(tmp, "raw.bin")
        fd = os.open(raw_path, os.O_RDWR | os.O_CREAT, 0o600)
        buf = src.numpy()
        rbuf = dst.numpy()
        scratch = torch.empty(_FLUSH_BYTES, dtype=torch.uint8)

        def flush() -> None:
            scratch.fill_(0)

        def timed(fn: Callable[[], object]) -> float:
            flush()
            t0 = time.perf_counter()
            fn()
            return nbytes / (time.perf_counter() - t0) / 1e9

        try:
            ids = store.allocate(num_blocks)
            for i in range(repeats + 1):  # the first round warms pages and caches
                keep = i > 0
                flush()
                r = store.demote(ids, dst_tier="host")
                assert r is not None
                host_ids = list(r.plan.dst_block_ids)
                mem = timed(lambda: dst.copy_(src))
                flush()
                r2 = store.promote(host_ids, src_tier="host")
                assert r2 is not None
                ids = list(r2.plan.dst_block_ids)
                if keep:
                    out["device_to_host"].append(r.bandwidth_gbps)
                    out["host_to_device"].append(r2.bandwidth_gbps)
                    out["raw_memcpy"].append(mem)
                # disk: device -> host (untimed), host -> disk, disk -> device
                r = store.demote(ids, dst_tier="host")
                assert r is not None
                flush()
                r3 = store.demote(list(r.plan.dst_block_ids), src_tier="host", dst_tier="disk")
                assert r3 is not None
                wr = timed(lambda: os.pwrite(fd, buf.data, 0))
                flush()
                r4 = store.promote(list(r3.plan.dst_block_ids), src_tier="disk")
                assert r4 is not None
                ids = list(r4.plan.dst_block_ids)
                rd = timed(lambda: os.preadv(fd, [rbuf.data], 0))
                if keep:
                    out["host_to_disk"].append(r3.bandwidth_gbps)
                    out["disk_to_device"].append(r4.bandwidth_gbps)
                    out["raw_file_write"].append(wr)
                    out["raw_file_read"].append(rd)
        finally:
            os.close(fd)
    res = {f"{k}_gbps": _median_gbps(v) for k, v in out.items()}
    res["device_to_host_ratio"] = res["device_to_host_gbps"] / res["raw_memcpy_gbps"]
    res["host_to_device_ratio"] = res["host_to_device_gbps"] / res["raw_memcpy_gbps"]
    res["host_to_disk_ratio"] = res["host_to_disk_gbps"] / res["raw_file_write_gbps"]
    res["disk_to_device_ratio"] = res["disk_to_device_gbps"] / res["raw_file_read_gbps"]
    res["num_bytes"] = float(nbytes)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--directory", default=None, help="where the disk tier file goes")
    args = parser.parse_args(argv)
    r = measure(args.blocks, args.repeats, args.directory)
    print(f"{args.blocks} blocks of {SCHEMA.bytes_per_block} bytes = {int(r['num_bytes'])} bytes")
    print("| move | store GB/s | raw baseline | raw GB/s | ratio |")
    print("|---|---|---|---|---|")
    rows = (
        ("device -> host", "device_to_host", "memcpy (copy_)", "raw_memcpy"),
        ("host -> device", "host_to_device", "memcpy (copy_)", "raw_memcpy"),
        ("host -> disk", "host_to_disk", "file pwrite", "raw_file_write"),
        ("disk -> device", "disk_to_device", "file preadv", "raw_file_read"),
    )
    for label, key, base_label, base in rows:
        print(
            f"| {label} | {r[key + '_gbps']:.2f} | {base_label} | {r[base + '_gbps']:.2f} "
            f"| {r[key + '_ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
