from __future__ import annotations

from sagellm.core.testing import SchedulerConformance
from sagellm.scheduler_ir import (
    AdaptiveScheduler,
    AdaptiveSchedulerConfig,
    FairScheduler,
    FairSchedulerConfig,
    FCFSScheduler,
    FCFSSchedulerConfig,
    PDScheduler,
    PDSchedulerConfig,
    PriorityScheduler,
    PrioritySchedulerConfig,
    SLOScheduler,
    SLOSchedulerConfig,
)
from sagellm.scheduler_ir.sim import BlockLedger


class TestFCFSConformance(SchedulerConformance):
    cls = FCFSScheduler
    cfg = FCFSSchedulerConfig
    extra: dict = {}

    def make_pool(self, num_blocks: int, block_size: int) -> BlockLedger:
        return BlockLedger(num_blocks, block_size)

    def make_scheduler(self, pool, max_model_len, max_num_seqs, max_num_batched_tokens):
        cfg = self.cfg(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, **self.extra
        )
        return self.cls(cfg, kv_pool=pool, max_model_len=max_model_len)


class TestPriorityConformance(TestFCFSConformance):
    cls = PriorityScheduler
    cfg = PrioritySchedulerConfig


class TestFairConformance(TestFCFSConformance):
    cls = FairScheduler
    cfg = FairSchedulerConfig
    extra = {"quantum": 8, "weights": {"": 2.0}}


class TestSLOConformance(TestFCFSConformance):
    cls = SLOScheduler
    cfg = SLOSchedulerConfig
    extra = {"default_ttft_ms": 200.0, "default_tpot_ms": 20.0}


class TestAdaptiveConformance(TestFCFSConformance):
    cls = AdaptiveScheduler
    cfg = AdaptiveSchedulerConfig
    extra = {"target_tpot_ms": 20.0}  # a tight objective: the prefill cap is active


class TestPDConformance(TestFCFSConformance):
    cls = PDScheduler
    cfg = PDSchedulerConfig
    extra = {"prefill_token_budget": 48, "decode_token_budget": 8, "max_num_prefill_seqs": 3}


class TestAdmissionQueueConformance(TestFCFSConformance):
    extra = {"max_waiting": 2, "max_queue_tokens": 64}
