from __future__ import annotations

from sagellm.core.testing import SchedulerConformance

from sagellm.scheduler_ir import FCFSScheduler, FCFSSchedulerConfig

from .conftest import ListPool


class TestFCFSConformance(SchedulerConformance):
    def make_pool(self, num_blocks: int, block_size: int) -> ListPool:
        return ListPool(num_blocks, block_size)

    def make_scheduler(self, pool, max_model_len, max_num_seqs, max_num_batched_tokens):
        cfg = FCFSSchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        )
        return FCFSScheduler(cfg, kv_pool=pool, max_model_len=max_model_len)
