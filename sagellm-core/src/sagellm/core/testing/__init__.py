"""Conformance kit: one pytest base class per protocol, shared by every implementation.

An implementation's tests subclass the suite of its slot and provide a factory method;
pytest then runs every inherited ``test_*`` method against that implementation::

    from sagellm.core.testing import KVPoolConformance

    class TestPagedPoolConformance(KVPoolConformance):
        def make_pool(self, schema, num_blocks):
            return PagedKVPool(PagedKVPoolConfig(num_blocks=num_blocks), schema=schema)

| suite | factory method(s) |
|---|---|
| :class:`KVPoolConformance` | ``make_pool(schema, num_blocks)`` |
| :class:`PrefixIndexConformance` | ``make_index(block_size)`` |
| :class:`EvictionPolicyConformance` | ``make_policy(capacity)`` |
| :class:`LifetimePredictorConformance` | ``make_predictor()`` |
| :class:`SchedulerConformance` | ``make_pool(num_blocks, block_size)`` and ``make_scheduler(pool, max_model_len, max_num_seqs, max_num_batched_tokens)`` |
| :class:`PlatformConformance` | ``make_platform()`` |
| :class:`ProposerConformance` | ``make_proposer(num_speculative_tokens)`` |
| :class:`CoTControllerConformance` | ``make_controller()`` (marker ids below ``vocab_size``) |
| :class:`TopologyDetectorConformance` | ``make_detector()`` |
| :class:`CommBackendConformance` | ``run_ranks(world_size, program)`` (runs ``program(backend, world_size)`` on each rank; torch needed) |
| :class:`OverlapSchedulerConformance` | ``make_scheduler()`` (default configuration) |
| :class:`KVTransferChannelConformance` | ``run_pair(producer, consumer, lease_s)`` (runs each program in its own process with a channel, a pool and a link; torch needed) |
| :class:`QuantizerConformance` | ``make_quantizer()``; optionally ``make_layers()``, ``make_unfit_layers()`` and ``calibration_run(layers)`` (needs torch) |
| :class:`SparsifierConformance` | ``make_sparsifier()``; optionally ``make_layers()`` and ``calibration_run(layers)`` (needs torch) |

The suite classes are not collected by pytest themselves (their names do not start with
``Test``). Property-based tests use hypothesis; a subclass may set the class attribute
``max_examples`` to trade thoroughness for time.

Multi-process tests and benchmarks launch their ranks with :mod:`.ranks`
(:func:`run_ranks`, :func:`run_comm_ranks` with a comm backend per rank,
:func:`run_programs` with a program per rank; :class:`RankContext`, :class:`RankError`,
:class:`RankOutcome`), also exported here.

The suites need pytest and hypothesis (``pip install 'sagellm-core[testing]'``); the
launcher needs neither, and research packages import it at run time: every name here is
imported when first looked up, so importing the launcher loads no suite.
``sagellm.core`` itself never imports this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sagellm.core.testing.comm import CommBackendConformance
    from sagellm.core.testing.cot import CoTControllerConformance
    from sagellm.core.testing.eviction import EvictionPolicyConformance
    from sagellm.core.testing.kv_pool import KVPoolConformance
    from sagellm.core.testing.kv_transfer import KVTransferChannelConformance
    from sagellm.core.testing.lifetime import LifetimePredictorConformance
    from sagellm.core.testing.overlap import OverlapSchedulerConformance
    from sagellm.core.testing.platform import PlatformConformance
    from sagellm.core.testing.prefix_index import PrefixIndexConformance
    from sagellm.core.testing.proposer import ProposerConformance
    from sagellm.core.testing.quantizer import QuantizerConformance
    from sagellm.core.testing.ranks import (
        RankContext,
        RankError,
        RankOutcome,
        run_comm_ranks,
        run_programs,
        run_ranks,
    )
    from sagellm.core.testing.scheduler import (
        SchedulerConformance,
        SchedulerRun,
        WorkloadRequest,
        drive_to_completion,
    )
    from sagellm.core.testing.sparsifier import SparsifierConformance
    from sagellm.core.testing.topology import TopologyDetectorConformance

__all__ = [
    "CoTControllerConformance",
    "CommBackendConformance",
    "EvictionPolicyConformance",
    "KVPoolConformance",
    "KVTransferChannelConformance",
    "LifetimePredictorConformance",
    "OverlapSchedulerConformance",
    "PlatformConformance",
    "PrefixIndexConformance",
    "ProposerConformance",
    "QuantizerConformance",
    "RankContext",
    "RankError",
    "RankOutcome",
    "SchedulerConformance",
    "SchedulerRun",
    "SparsifierConformance",
    "TopologyDetectorConformance",
    "WorkloadRequest",
    "drive_to_completion",
    "run_comm_ranks",
    "run_programs",
    "run_ranks",
]

# name -> module of this package that defines it; the launcher needs no pytest
_LAUNCHER = {
    name: "ranks"
    for name in (
        "RankContext",
        "RankError",
        "RankOutcome",
        "run_comm_ranks",
        "run_programs",
        "run_ranks",
    )
}
_SUITES = {
    "CoTControllerConformance": "cot",
    "CommBackendConformance": "comm",
    "EvictionPolicyConformance": "eviction",
    "KVPoolConformance": "kv_pool",
    "KVTransferChannelConformance": "kv_transfer",
    "LifetimePredictorConformance": "lifetime",
    "OverlapSchedulerConformance": "overlap",
    "PlatformConformance": "platform",
    "PrefixIndexConformance": "prefix_index",
    "ProposerConformance": "proposer",
    "QuantizerConformance": "quantizer",
    "SchedulerConformance": "scheduler",
    "SchedulerRun": "scheduler",
    "SparsifierConformance": "sparsifier",
    "TopologyDetectorConformance": "topology",
    "WorkloadRequest": "scheduler",
    "drive_to_completion": "scheduler",
}


def __getattr__(name: str) -> Any:
    # PEP 562: a name's module (and for a suite, pytest and hypothesis) loads on first use
    module = _LAUNCHER.get(name) or _SUITES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _SUITES:
        _require_the_testing_extra()
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def _require_the_testing_extra() -> None:
    try:
        import hypothesis  # noqa: F401
        import pytest  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "sagellm.core.testing needs pytest and hypothesis; install them with "
            "pip install 'sagellm-core[testing]'"
        ) from exc


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
