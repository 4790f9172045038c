"""Configuration of the prefix indexes.

The block size and the eviction policy are not options: they come from the engine as
construction context (``block_size=``, ``eviction_policy=``), because the KV pool and the
eviction slot own them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BlockHashPrefixIndexConfig", "PrefixIndexConfig", "RadixPrefixIndexConfig"]


class PrefixIndexConfig(BaseModel):
    """Options shared by every index of this package."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # lookups whose latency is kept (reservoir sample) between two make_stats() calls
    latency_reservoir_size: int = Field(1024, ge=1, le=1_000_000)
    # seed of the reservoir sampling, so p50/p99 are reproducible for a fixed workload
    latency_seed: int = 0


class RadixPrefixIndexConfig(PrefixIndexConfig):
    """Options of :class:`~sagellm.prefix_cache.radix.RadixPrefixIndex`."""


class BlockHashPrefixIndexConfig(PrefixIndexConfig):
    """Options of :class:`~sagellm.prefix_cache.block_hash.BlockHashPrefixIndex`."""

    # "builtin": Python's hash of (parent hash, block tokens, isolation key), fast but
    # randomised per process for string keys; "sha256": stable across processes and
    # machines (for KV blocks exchanged between instances), about 3x slower to compute.
    hash_algorithm: Literal["builtin", "sha256"] = "builtin"
