"""Rank processes fork from a server that has imported these once (fast starts)."""

from sagellm.collective_ops.launch import preload

preload(["sagellm.core.testing.comm", "rank_programs", "pytest"])
