"""sagellm.eviction: eviction policies for KV blocks and prefix-cache entries.

Seven implementations of :class:`sagellm.core.protocols.EvictionPolicy` (entry-point
group ``sagellm.eviction``): ``lru``, ``fifo``, ``lfu``, ``arc``, ``s3fifo`` and
``sieve`` reproduce libCacheSim's algorithms exactly under its get loop; ``cost_aware``
is a GreedyDual policy weighing recompute cost by predicted reuse. Also: a seeded LLM
KV-block trace generator (:mod:`sagellm.eviction.trace`), a simulator
(:mod:`sagellm.eviction.simulate`), the libCacheSim comparison
(``python -m sagellm.eviction.compare``) and a benchmark (``python -m sagellm.eviction.bench``).

Usage::

    from sagellm.core import registry

    policy = registry.load("eviction", "s3fifo", {}, capacity=1024)
    policy.insert(("block", 7), now=0.0, features={"prefix_depth": 128.0})
    policy.access(("block", 7), now=1.0)
    policy.pin(("block", 7))  # in use: never a victim
    victims = policy.evict(1).victims
"""

from sagellm.eviction._version import __version__
from sagellm.eviction.arc import ARCPolicy
from sagellm.eviction.config import (
    ARCConfig,
    CostAwareConfig,
    EvictionConfig,
    FIFOConfig,
    KVTraceConfig,
    LFUConfig,
    LRUConfig,
    S3FIFOConfig,
    SieveConfig,
    ZipfTraceConfig,
)
from sagellm.eviction.cost_aware import CostAwarePolicy
from sagellm.eviction.errors import KeyAlreadyHeldError, KeyNotHeldError, NotPinnedError
from sagellm.eviction.fifo import FIFOPolicy
from sagellm.eviction.lfu import LFUPolicy
from sagellm.eviction.lru import LRUPolicy
from sagellm.eviction.s3fifo import S3FIFOPolicy
from sagellm.eviction.sieve import SievePolicy
from sagellm.eviction.simulate import SimulationResult, simulate

#: entry-point name -> policy class
POLICIES = {
    "lru": LRUPolicy,
    "fifo": FIFOPolicy,
    "lfu": LFUPolicy,
    "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy,
    "sieve": SievePolicy,
    "cost_aware": CostAwarePolicy,
}

__all__ = [
    "POLICIES",
    "ARCConfig",
    "ARCPolicy",
    "CostAwareConfig",
    "CostAwarePolicy",
    "EvictionConfig",
    "FIFOConfig",
    "FIFOPolicy",
    "KVTraceConfig",
    "KeyAlreadyHeldError",
    "KeyNotHeldError",
    "LFUConfig",
    "LFUPolicy",
    "LRUConfig",
    "LRUPolicy",
    "NotPinnedError",
    "S3FIFOConfig",
    "S3FIFOPolicy",
    "SieveConfig",
    "SievePolicy",
    "SimulationResult",
    "ZipfTraceConfig",
    "__version__",
    "simulate",
]
