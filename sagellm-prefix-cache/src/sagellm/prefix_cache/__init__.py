"""sagellm.prefix_cache: indexes from token prefixes to cached KV blocks.

Two implementations of :class:`sagellm.core.protocols.PrefixIndex`, registered under the
``sagellm.prefix_cache`` entry-point group: ``radix`` (a radix tree whose edges are runs
of full blocks, SGLang-style) and ``block_hash`` (hash-chained full blocks, vLLM-style).
Both separate tenants/cache salts, lock matched paths and evict leaves first.

Usage::

    from sagellm.prefix_cache import RadixPrefixIndex, RadixPrefixIndexConfig

    index = RadixPrefixIndex(RadixPrefixIndexConfig(), block_size=4)
    index.insert([1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12])  # -> [10, 11] (full blocks)
    hit = index.match([1, 2, 3, 4, 5, 6, 7, 0])  # hit.block_ids == (10,), num_tokens == 4
    index.lock(hit)      # the blocks cannot be evicted while a request uses them
    index.unlock(hit)
    index.evict(2)       # -> [11, 10]: ids whose pool reference the caller drops
"""

from sagellm.prefix_cache._version import __version__
from sagellm.prefix_cache.block_hash import BlockHashPrefixIndex
from sagellm.prefix_cache.config import (
    BlockHashPrefixIndexConfig,
    PrefixIndexConfig,
    RadixPrefixIndexConfig,
)
from sagellm.prefix_cache.errors import PrefixLockError, StalePrefixMatchError
from sagellm.prefix_cache.radix import RadixPrefixIndex

__all__ = [
    "BlockHashPrefixIndex",
    "BlockHashPrefixIndexConfig",
    "PrefixIndexConfig",
    "PrefixLockError",
    "RadixPrefixIndex",
    "RadixPrefixIndexConfig",
    "StalePrefixMatchError",
    "__version__",
]
