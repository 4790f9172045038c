"""Pair processes fork from a forkserver that has imported these once (fast starts)."""

from sagellm.kv_transfer.launch import preload

preload(["sagellm.core.testing.kv_transfer", "pair_programs"])
