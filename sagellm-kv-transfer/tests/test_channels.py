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


def test_a_consumer_may_come_long_after_its_producer() -> None:
    """The producer waits for its consumer for as long as it is open, not ``timeout_s``:
    a decode instance started minutes after the prefill one still pairs with it."""
    import time

    import torch

    schema = KVCacheSchema(num_layers=2, num_kv_heads=1, head_dim=4, block_size=2)
    src = HostKVPool(HostKVPoolConfig(num_blocks=4), schema=schema)
    dst = HostKVPool(HostKVPoolConfig(num_blocks=4), schema=schema)
    producer = TorchKVChannel(TorchChannelConfig(role="producer", timeout_s=1.0), pool=src)
    consumer = None
    try:
        ids = src.allocate(2)
        for layer in range(2):
            for j, kv in enumerate(src.layer_cache(layer)):
                kv[ids] = torch.arange(16, dtype=kv.dtype).view(2, 2, 1, 4) + 100 * layer + 10 * j
        _, plan = producer.request_finished("r", ids)
        assert plan is not None
        time.sleep(2.5)  # more than twice the producer's timeout_s
        consumer = TorchKVChannel(
            TorchChannelConfig(role="consumer", address=producer.address, timeout_s=1.0), pool=dst
        )
        consumer.add_remote_request(plan)
        dst_ids = dst.allocate(2)
        load = consumer.update_state_after_alloc("r", dst_ids, plan.num_tokens)
        consumer.start_load(load)
        consumer.wait(load)
        for layer in range(2):
            for a, b in zip(src.layer_cache(layer), dst.layer_cache(layer)):
                assert torch.equal(a[ids], b[dst_ids])
    finally:
        if consumer is not None:
            consumer.close()
        producer.close()
