"""KV manager API over an lmdeploy ``Scheduler``: block info, eviction callbacks, migration.

Anchor: vLLM v1 ``KVCacheManager`` (block tables and usage as plain data). lmdeploy keeps
blocks in the scheduler's ``block_manager`` (allocator with reference counts and access
times) and ``block_trie``; this reads them, and moves blocks with lmdeploy's own GPU/CPU
swap (``try_swap_out`` / ``try_swap_in``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from sagellm.engine.runtime.lmdeploy.hooks import EvictionEvent, LMDeployHooks

__all__ = ["LMDeployKVManager"]


class LMDeployKVManager:
    """Reads and moves the KV blocks of one lmdeploy ``Scheduler``."""

    def __init__(self, scheduler: Any, hooks: LMDeployHooks) -> None:
        self.scheduler = scheduler
        self.hooks = hooks

    def get_block_info(self) -> dict[str, Any]:
        """Block tables, reference counts, access times, trie leaves and usage.

        ``block_tables``: seq id -> (logical ids, physical ids); ``ref_counts`` and
        ``access_times``: logical id -> value for every block in use; ``trie_leaves``:
        logical ids of the trie's leaves, ascending.
        """
        bm = self.scheduler.block_manager
        tables: dict[int, tuple[list[int], list[int]]] = {}
        used: set[int] = set()
        for seq in self.scheduler.seq_manager.get_all_sequences():
            logical = [int(b) for b in seq.logical_blocks.get_real_blocks()]
            tables[int(seq.seq_id)] = (logical, [int(b) for b in bm.get_block_table(seq)])
            used.update(logical)
        leaves = sorted(
            int(getattr(n, "block_id", getattr(n, "block", -1)))
            for n in self.scheduler.block_trie.leaves
        )
        used.update(leaves)
        ids = np.array(sorted(used), dtype=np.int64)
        refs = bm.allocator.get_ref_count(ids) if len(ids) else []
        times = bm.allocator.get_access_time(ids) if len(ids) else []
        num_gpu, free_gpu = int(bm.num_gpu_blocks), int(bm.get_num_free_gpu_blocks())
        return {
            "block_tables": tables,
            "ref_counts": {int(b): int(r) for b, r in zip(ids, refs)},
            "access_times": {int(b): float(t) for b, t in zip(ids, times)},
            "trie_leaves": leaves,
            "num_gpu_blocks": num_gpu,
            "num_free_gpu_blocks": free_gpu,
            "num_cpu_blocks": int(bm.num_cpu_blocks),
            "num_free_cpu_blocks": int(bm.get_num_free_cpu_blocks()),
            "usage": 1.0 - free_gpu / num_gpu if num_gpu else 0.0,
        }

    def register_eviction_callback(self, callback: Callable[[EvictionEvent], None]) -> None:
        """Call ``callback(event)`` for every trie eviction, after lmdeploy freed the blocks."""
        if not callable(callback):
            raise TypeError(f"eviction callback must be callable, got {type(callback).__name__}")
        self.hooks.eviction_callbacks.append(callback)

    def migrate_blocks(self, plan: Mapping[int, str]) -> dict[int, dict[int, int]]:
        """Move whole sequences between tiers: ``{seq_id: "cpu" | "gpu"}``.

        Uses lmdeploy's swap, so it needs ``num_cpu_blocks > 0`` and sequences whose
        blocks only they reference (ref count 1). Returns ``{seq_id: {src: dst}}``, the
        physical copy plan the cache engine must execute; lmdeploy's 0.18 scheduler
        returns no swap maps itself, so the caller hands this plan to the copy.
        """
        seqs = {int(s.seq_id): s for s in self.scheduler.seq_manager.get_all_sequences()}
        out: dict[int, dict[int, int]] = {}
        for seq_id, tier in plan.items():
            if tier not in ("cpu", "gpu"):
                raise ValueError(
                    f"migration target for seq {seq_id} must be 'cpu' or 'gpu', got {tier!r}"
                )
            if seq_id not in seqs:
                raise KeyError(f"no lmdeploy sequence {seq_id}; known: {sorted(seqs)}")
            bm = self.scheduler.block_manager
            swap: Sequence[Any] = (bm.try_swap_out if tier == "cpu" else bm.try_swap_in)(
                seqs[seq_id]
            )
            ok, mapping = swap
            if not ok:
                raise RuntimeError(
                    f"lmdeploy refused to move seq {seq_id} to {tier}: it needs free {tier} blocks "
                    "(num_cpu_blocks > 0 for cpu) and blocks no other sequence or the trie shares"
                )
            out[seq_id] = {int(k): int(v) for k, v in dict(mapping).items()}
        return out
