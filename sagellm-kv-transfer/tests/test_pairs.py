"""Two real processes: a vanished peer, int8 compression, no process left behind."""

from __future__ import annotations

import multiprocessing as mp

import pair_programs as progs
import pytest
import torch

from sagellm.core.testing.kv_transfer import block_values
from sagellm.core.types import KVCacheSchema
from sagellm.kv_transfer.compress import error_bound
from sagellm.kv_transfer.launch import run_pair
from sagellm.kv_transfer.plan import wire_bytes

# 24 blocks of 2 x 4 layers x 8 heads x 16 tokens x 64 float32: 2 MiB per layer
BIG = KVCacheSchema(num_layers=4, num_kv_heads=8, head_dim=64, block_size=16)


def test_consumer_killed_mid_transfer_frees_every_block_after_the_lease() -> None:
    p, c = run_pair(
        progs.offer_and_wait,
        progs.load_then_die,
        24,
        20.0,
        schema=BIG,
        num_blocks=24,
        options={"lease_s": 1.5, "timeout_s": 10.0, "chunk_blocks": 2},
        timeout_s=60,
        check=False,
    )
    assert c.status == "exit" and c.value == 17
    assert p.status == "ok", p.value
    assert p.value["free"] == 24  # every block back in the producer's pool
    assert p.value["released_s"] is not None and p.value["released_s"] >= 1.5 * 0.9
    assert p.value["stats"].num_expired == 1 and p.value["stats"].num_acked == 0
    assert p.value["stats"].num_blocks_freed == 24
    assert mp.active_children() == []


def test_producer_gone_gives_the_consumer_a_clear_error() -> None:
    p, c = run_pair(
        progs.offer_then_die,
        progs.load_expecting_error,
        24,
        20.0,
        schema=BIG,
        num_blocks=24,
        options={"lease_s": 5.0, "timeout_s": 8.0, "chunk_blocks": 1},
        timeout_s=60,
        check=False,
    )
    assert p.status == "exit" and p.value == 17
    assert c.status == "ok", c.value
    kind, message, seconds = c.value
    assert kind == "KVTransferError"
    assert "'big'" in message and "the producer" in message
    assert seconds < 8.0 + 2.0  # not a hang: at most the channel's timeout
    assert mp.active_children() == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_compression_error_is_within_its_bound(dtype: str) -> None:
    schema = KVCacheSchema(num_layers=2, num_kv_heads=4, head_dim=32, block_size=8, dtype=dtype)
    p, c = run_pair(
        progs.offer_and_wait,
        progs.compressed_load,
        5,
        20.0,
        schema=schema,
        num_blocks=8,
        options={"compression": "int8", "chunk_blocks": 2, "timeout_s": 20.0},
        timeout_s=60,
    )
    assert p.value["free"] == 8  # acknowledged, then freed
    got = c.value["got"]
    sent = 0
    for layer in range(2):
        for j in range(2):
            want = torch.stack([block_values(schema, "big", layer, j, i) for i in range(5)])
            bound = error_bound(want)
            err = (got[layer][j].float() - want.float()).abs()
            # bfloat16 rounds the dequantized value once more: half an ulp (2^-8 relative)
            slack = want.float().abs() * (2**-8 if dtype == "bfloat16" else 1e-6)
            assert bool((err <= bound * (1 + 1e-5) + slack).all()), float((err - bound).max())
            assert float(err.max()) > 0  # it did go through int8
    sent = c.value["stats"].bytes_received
    assert sent == wire_bytes(schema, 5, 2, "int8")
    ratio = wire_bytes(schema, 5, 2, "none") / sent
    assert ratio > (3.5 if dtype == "float32" else 1.8)


@pytest.mark.parametrize("pipeline", [True, False])
def test_scattered_block_ids_arrive_exactly_through_staging(pipeline: bool) -> None:
    """Ids that are not consecutive go through the staging buffers (consecutive ones are
    sent from and received into the pools' own storage): every byte arrives either way."""
    schema = KVCacheSchema(num_layers=3, num_kv_heads=2, head_dim=16, block_size=4)
    n = 7
    p, c = run_pair(
        progs.offer_scattered,
        progs.load_scattered,
        n,
        20.0,
        schema=schema,
        num_blocks=2 * n,
        options={"chunk_blocks": 3, "pipeline": pipeline, "timeout_s": 20.0},
        timeout_s=60,
    )
    assert len(set(p.value)) == n and sorted(p.value) != list(p.value)  # really scattered
    for layer in range(3):
        for j in range(2):
            want = torch.stack([block_values(schema, "big", layer, j, i) for i in range(n)])
            assert torch.equal(c.value[layer][j], want)
