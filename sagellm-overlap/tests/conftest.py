"""Rank processes fork from a server that has imported these once (fast starts)."""

from sagellm.overlap.launch import preload

preload(["sagellm.overlap.programs", "rank_programs"])
