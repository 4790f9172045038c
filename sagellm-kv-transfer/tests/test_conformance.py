"""Core's KVTransferChannelConformance for the torch channel, in three wire formats."""

from __future__ import annotations

from typing import Any, ClassVar

from sagellm.core.testing import KVTransferChannelConformance
from sagellm.core.types import KVCacheSchema
from sagellm.kv_transfer.launch import run_pair


class TestTorchChannelFloat32Pipelined(KVTransferChannelConformance):
    options: ClassVar[dict[str, Any]] = {"chunk_blocks": 1, "pipeline": True}

    def run_pair(self, producer, consumer, lease_s):  # type: ignore[no-untyped-def]
        p, c = run_pair(
            producer,
            consumer,
            lease_s,
            schema=self.schema,
            num_blocks=self.num_blocks,
            options={**self.options, "lease_s": lease_s, "timeout_s": 30.0},
            timeout_s=60,
        )
        return p.value, c.value


class TestTorchChannelBfloat16Serial(TestTorchChannelFloat32Pipelined):
    schema = KVCacheSchema(
        num_layers=2, num_kv_heads=3, head_dim=16, block_size=8, dtype="bfloat16"
    )
    options: ClassVar[dict[str, Any]] = {"chunk_blocks": 2, "pipeline": False}


class TestTorchChannelBigChunks(TestTorchChannelFloat32Pipelined):
    options: ClassVar[dict[str, Any]] = {"chunk_blocks": 64, "pipeline": True}
