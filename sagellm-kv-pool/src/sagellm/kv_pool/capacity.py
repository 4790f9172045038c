"""How many blocks a pool gets: from a block count, a byte size or a share of free memory."""

from __future__ import annotations

import os

import torch

from sagellm.core.errors import ConfigError
from sagellm.core.types import KVCacheSchema
from sagellm.kv_pool.config import DEFAULT_MEMORY_BYTES, PagedKVPoolConfig

__all__ = ["free_device_memory", "parse_device", "resolve_num_blocks"]


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`; a malformed string raises ConfigError."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device {device!r} is not a torch device string; use e.g. 'cpu' or 'cuda:0'"
        ) from exc


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    # not Linux (or no /proc): the free physical pages the C library reports
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_memory(device: torch.device) -> int:
    """Bytes currently free on ``device`` (CPU: MemAvailable; CUDA: mem_get_info)."""
    if device.type == "cpu":
        return _cpu_available_bytes()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    raise ConfigError(
        f"memory_fraction cannot read free memory of a {device.type!r} device; "
        "set num_blocks or memory_bytes instead"
    )


def resolve_num_blocks(
    config: PagedKVPoolConfig, schema: KVCacheSchema, device: torch.device
) -> int:
    """Capacity in blocks for ``config``; raises ConfigError when it comes to zero blocks."""
    if config.num_blocks is not None:
        return config.num_blocks
    per_block = schema.bytes_per_block
    if config.memory_fraction is not None:
        budget = int(free_device_memory(device) * config.memory_fraction)
        source = f"memory_fraction={config.memory_fraction} of the free memory of {device}"
    else:
        budget = config.memory_bytes if config.memory_bytes is not None else DEFAULT_MEMORY_BYTES
        source = f"memory_bytes={budget}"
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ConfigError(
            f"{source} ({budget} bytes) holds no block of {per_block} bytes; "
            "give more memory or a smaller block_size"
        )
    return num_blocks
