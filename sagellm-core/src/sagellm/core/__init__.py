"""sagellm.core: the protocols, types, config and registry every sageLLM package shares.

Usage::

    from sagellm.core import registry
    from sagellm.core.types import KVCacheSchema

    for info in registry.available("kv_pool"):
        print(info.name, info.distribution, info.version)
    pool = registry.load("kv_pool", "paged", {"num_blocks": 64},
                         schema=KVCacheSchema(num_layers=2, num_kv_heads=2, head_dim=8),
                         device="cpu")

Modules: ``protocols`` (one Protocol per slot), ``types`` (data crossing package lines),
``registry`` (entry points), ``config`` (EngineConfig), ``platforms`` (cpu, cuda, rocm and
plugins), ``ports`` (the one place choosing ports), ``errors``, ``telemetry``, and the
conformance kit ``testing`` (needs the ``testing`` extra). ``python -m sagellm.core``
lists what is installed.

Importing this package does not import torch.
"""

from sagellm.core._version import __version__

__all__ = ["__version__"]
