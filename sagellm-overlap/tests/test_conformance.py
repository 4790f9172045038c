"""Core's OverlapSchedulerConformance for both modes of MicroBatchOverlap."""

from __future__ import annotations

from sagellm.core.testing import OverlapSchedulerConformance
from sagellm.overlap import MicroBatchOverlap, OverlapConfig


class TestOverlapMode(OverlapSchedulerConformance):
    max_examples = 60

    def make_scheduler(self) -> MicroBatchOverlap:
        return MicroBatchOverlap(OverlapConfig(mode="overlap"))


class TestSerialMode(OverlapSchedulerConformance):
    def make_scheduler(self) -> MicroBatchOverlap:
        return MicroBatchOverlap(OverlapConfig(mode="serial"))


class TestWholePrefillChunks(OverlapSchedulerConformance):
    def make_scheduler(self) -> MicroBatchOverlap:
        return MicroBatchOverlap(OverlapConfig(split_prefill=False))
