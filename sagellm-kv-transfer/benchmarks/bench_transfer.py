"""asv benchmarks of sagellm.kv_transfer: plan arithmetic, int8 packing, and the torch
channel's bandwidth against raw gloo in the same run (track_* ratios)."""

from sagellm.core.types import KVCacheSchema
from sagellm.kv_transfer.bench import measure
from sagellm.kv_transfer.plan import messages

SCHEMA = KVCacheSchema(num_layers=8, num_kv_heads=8, head_dim=128, block_size=16)


class PlanSuite:
    def time_messages_1k_blocks(self) -> None:
        messages(32, list(range(1024)), list(range(1024, 2048)), 8)


class Int8Suite:
    def setup(self) -> None:
        import torch

        self.x = torch.randn(8, 16, 8, 128)
        self.q = torch.empty(8, 16, 8, 128, dtype=torch.int8)
        self.s = torch.empty(8, 8)

    def time_quantize_8_blocks(self) -> None:
        from sagellm.kv_transfer.compress import quantize_into

        quantize_into(self.x, self.q, self.s)


class BandwidthSuite:
    timeout = 300
    number = 1
    repeat = 1

    def setup_cache(self) -> dict:
        return measure(num_blocks=32, num_layers=8, reps=5, chunk_blocks=8)

    def track_channel_vs_raw_gloo(self, result: dict) -> float:
        return result["channel_vs_raw_gloo"]

    track_channel_vs_raw_gloo.unit = "ratio"  # type: ignore[attr-defined]

    def track_channel_gbps(self, result: dict) -> float:
        return result["GB/s"]["channel"]

    track_channel_gbps.unit = "GB/s"  # type: ignore[attr-defined]
