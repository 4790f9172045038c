"""sagellm.core: the protocols, types, config and registry every sageLLM package shares.

Usage::

    from sagellm.core import registry
    from sagellm.core.types import KVCacheSchema

    for info in registry.available("kv_pool"):
        print(info.name, info.distribution, info.version)
    pool = registry.load("kv_pool", "paged", {"num_blocks": 64},
                         schema=KVCacheSchema(num_layers=2, num_kv_heads=2, head_dim=8),
                         device="cpu")

Importing this package does not import torch.
"""

from sagellm.core._version import __version__

__all__ = ["__version__"]
