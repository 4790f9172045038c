"""Construction errors, optional transports and the entry points."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
from pydantic import ValidationError

from sagellm.core.protocols import KVTransferChannel
from sagellm.core.types import KVCacheSchema
from sagellm.kv_transfer import (
    HostKVPool,
    HostKVPoolConfig,
    MooncakeChannelConfig,
    NixlChannelConfig,
    TorchChannelConfig,
    TorchKVChannel,
    TransportUnavailableError,
)
from sagellm.kv_transfer.errors import KVTransferError


def test_entry_points_name_the_three_channels() -> None:
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="sagellm.kv_transfer")}
    assert eps == {
        "torch": "sagellm.kv_transfer.torch_channel:TorchKVChannel",
        "mooncake": "sagellm.kv_transfer.mooncake:MooncakeKVChannel",
        "nixl": "sagellm.kv_transfer.nixl:NixlKVChannel",
    }


def test_bad_address_is_rejected() -> None:
    with pytest.raises(ValidationError, match="is not 'host:port'"):
        TorchChannelConfig(role="producer", address="localhost")


def test_int8_compression_of_an_int8_cache_is_refused() -> None:
    schema = KVCacheSchema(num_layers=1, num_kv_heads=1, head_dim=4, dtype="int8", scale_bytes=2)
    pool = HostKVPool(HostKVPoolConfig(num_blocks=2), schema=schema)
    with pytest.raises(ValueError, match="int8 compression needs a float32/bfloat16/float16"):
        TorchKVChannel(TorchChannelConfig(role="producer", compression="int8"), pool=pool)


def test_a_consumer_without_a_producer_fails_clearly() -> None:
    from sagellm.core.ports import find_free_port

    cfg = TorchChannelConfig(
        role="consumer", address=f"127.0.0.1:{find_free_port()}", timeout_s=1.0
    )
    with pytest.raises(KVTransferError, match="could not reach the producer at 127.0.0.1:"):
        TorchKVChannel(cfg)


def test_a_producer_alone_is_a_channel_and_closes() -> None:
    schema = KVCacheSchema(num_layers=1, num_kv_heads=1, head_dim=4)
    pool = HostKVPool(HostKVPoolConfig(num_blocks=4), schema=schema)
    ch = TorchKVChannel(TorchChannelConfig(role="producer", timeout_s=2.0), pool=pool)
    assert isinstance(ch, KVTransferChannel)
    ids = pool.allocate(2)
    keep, plan = ch.request_finished("r", ids)
    assert keep and plan is not None and plan.source == ch.address
    assert ch.request_finished("empty", []) == (False, None)
    with pytest.raises(RuntimeError, match="add_remote_request is a consumer-side call"):
        ch.add_remote_request(plan)
    ch.close()
    ch.close()  # idempotent
    assert pool.num_free_blocks == 4  # close frees what the channel owned


@pytest.mark.skipif(importlib.util.find_spec("mooncake") is not None, reason="mooncake installed")
def test_mooncake_missing_names_the_package() -> None:
    from sagellm.kv_transfer.mooncake import MooncakeKVChannel

    with pytest.raises(TransportUnavailableError, match="pip install mooncake-transfer-engine"):
        MooncakeKVChannel(MooncakeChannelConfig(role="producer"))


@pytest.mark.skipif(importlib.util.find_spec("nixl") is not None, reason="nixl installed")
def test_nixl_missing_names_the_package() -> None:
    from sagellm.kv_transfer.nixl import NixlKVChannel

    with pytest.raises(TransportUnavailableError, match="pip install nixl"):
        NixlKVChannel(NixlChannelConfig(role="producer"))
