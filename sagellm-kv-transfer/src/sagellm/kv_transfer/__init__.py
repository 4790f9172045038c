"""sagellm.kv_transfer: KV blocks between engine instances (prefill -> decode).

Core's ``KVTransferChannel`` (group ``sagellm.kv_transfer``) over three transports:
``torch`` (gloo point-to-point on a standalone process group: chunked, layer-pipelined,
optional int8), ``mooncake`` (Mooncake Transfer Engine writes) and ``nixl`` (NIXL reads).
A producer keeps a finished request's blocks until the consumer acknowledges them or a
lease expires.

Usage::

    from sagellm.kv_transfer import TorchChannelConfig, TorchKVChannel

    # prefill instance
    prod = TorchKVChannel(TorchChannelConfig(role="producer", address="0.0.0.0:29600"), pool=pool)
    keep, plan = prod.request_finished("req-1", block_ids)   # hand `plan` to the decode side
    prod.get_finished()                                      # every step: frees released blocks

    # decode instance
    cons = TorchKVChannel(TorchChannelConfig(role="consumer", address="host:29600"), pool=pool)
    cons.add_remote_request(plan)
    n = cons.get_num_matched_tokens("req-1", 0)
    load = cons.update_state_after_alloc("req-1", pool.allocate(len(plan.block_ids)), n)
    cons.start_load(load)
    cons.wait_for_layer(load, 0)   # layer 0 is in the pool
    cons.wait(load)                # every layer; the producer frees its blocks
"""

from sagellm.kv_transfer._version import __version__
from sagellm.kv_transfer.channel import BaseKVChannel, KVTransferStats
from sagellm.kv_transfer.config import (
    ChannelConfig,
    MooncakeChannelConfig,
    NixlChannelConfig,
    TorchChannelConfig,
)
from sagellm.kv_transfer.errors import KVTransferError, TransportUnavailableError
from sagellm.kv_transfer.host_pool import HostKVPool, HostKVPoolConfig
from sagellm.kv_transfer.torch_channel import TorchKVChannel

__all__ = [
    "BaseKVChannel",
    "ChannelConfig",
    "HostKVPool",
    "HostKVPoolConfig",
    "KVTransferError",
    "KVTransferStats",
    "MooncakeChannelConfig",
    "NixlChannelConfig",
    "TorchChannelConfig",
    "TorchKVChannel",
    "TransportUnavailableError",
    "__version__",
]
