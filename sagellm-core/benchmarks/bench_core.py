"""asv benchmarks of sagellm-core: registry lookup and load, config loading, hot-path types.

The hot-path types are measured side by side with plain dicts (the cheapest Python
container a scheduler could emit); ``track_*`` methods report the ratio.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import timeit
from pathlib import Path
from typing import Any

from sagellm.core import registry
from sagellm.core.config import load_engine_config
from sagellm.core.types import ScheduledChunk, SchedulerOutput

_GROUP = "sagellm.bench_slot"
_NUM_PLUGINS = 16

_PLUGIN_SOURCE = """
from typing import ClassVar
from pydantic import BaseModel, ConfigDict, Field

class BenchConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    capacity: int = Field(8, ge=1)
    decay: float = 0.5

class BenchImpl:
    config_class: ClassVar[type[BaseModel]] = BenchConfig

    def __init__(self, config, **context):
        self.config = config
"""


def _install_fake_plugins(root: Path) -> None:
    """A distribution with ``_NUM_PLUGINS`` entry points in a temporary sys.path folder."""
    info = root / "sagellm_bench_plugins-1.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sagellm-bench-plugins\nVersion: 1.0.0\n"
    )
    eps = "\n".join(f"impl{i} = sagellm_bench_mod:BenchImpl" for i in range(_NUM_PLUGINS))
    (info / "entry_points.txt").write_text(f"[{_GROUP}]\n{eps}\n")
    (root / "sagellm_bench_mod.py").write_text(_PLUGIN_SOURCE)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


class RegistrySuite:
    """Entry-point discovery and building an implementation by name."""

    def setup(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        _install_fake_plugins(Path(self._tmp.name))
        registry.reset_cache()
        registry.load(_GROUP, "impl0")  # warm: module imported, class cached

    def teardown(self) -> None:
        sys.path.remove(self._tmp.name)
        registry.reset_cache()
        self._tmp.cleanup()

    def time_available_cold(self) -> None:
        """Scan every installed distribution for the group (first call of a process)."""
        registry.reset_cache()
        registry.available(_GROUP)

    def time_available_cached(self) -> None:
        registry.available(_GROUP)

    def time_load_cached(self) -> None:
        """Validate options and build an instance of an already imported plugin."""
        registry.load(_GROUP, "impl3", {"capacity": 4})

    def time_load_class_cold(self) -> None:
        """Find and resolve an entry point after the discovery cache was dropped."""
        registry.reset_cache()
        registry.load_class(_GROUP, "impl7")


class ConfigSuite:
    """EngineConfig from a YAML file and environment variables."""

    def setup(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.path = Path(self._tmp.name) / "engine.yaml"
        self.path.write_text(
            "model: smollm2-135m\nblock_size: 32\ndtype: bfloat16\n"
            "scheduler:\n  name: fcfs\n  options:\n    max_num_seqs: 64\n    max_num_batched_tokens: 2048\n"
            "prefix_cache:\n  name: radix\n"
            "kv_pool:\n  options:\n    num_blocks: 4096\n"
        )
        self.env = {
            "SAGELLM_SEED": "3",
            "SAGELLM_SCHEDULER__MAX_NUM_SEQS": "32",
            "SAGELLM_EVICTION__NAME": "lru",
            "PATH": os.environ.get("PATH", ""),
        }

    def teardown(self) -> None:
        self._tmp.cleanup()

    def time_defaults(self) -> None:
        load_engine_config(environ={})

    def time_yaml_env_overrides(self) -> None:
        load_engine_config(self.path, environ=self.env, overrides={"block_size": 16})


def _chunk_args(seed: int, n: int) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        decode = rng.random() < 0.8
        num_tokens = 1 if decode else rng.randint(16, 256)
        computed = rng.randint(16, 2048)
        tokens = tuple(rng.randrange(49152) for _ in range(num_tokens))
        blocks = tuple(range(i * 64, i * 64 + -(-(computed + num_tokens) // 16)))
        rows.append((f"req-{i}", tokens, computed, blocks, True, not decode))
    return rows


def _build_types(rows: list[tuple[Any, ...]], step: int) -> SchedulerOutput:
    chunks = tuple(ScheduledChunk(*r) for r in rows)
    return SchedulerOutput(
        step_id=step,
        chunks=chunks,
        num_scheduled_tokens=sum(len(c.token_ids) for c in chunks),
        num_running=len(chunks),
    )


def _build_dicts(rows: list[tuple[Any, ...]], step: int) -> dict[str, Any]:
    chunks = tuple(
        {
            "request_id": r[0],
            "token_ids": r[1],
            "num_computed_tokens": r[2],
            "block_ids": r[3],
            "sample": r[4],
            "is_prefill": r[5],
            "num_draft_tokens": 0,
        }
        for r in rows
    )
    return {
        "step_id": step,
        "chunks": chunks,
        "num_scheduled_tokens": sum(len(c["token_ids"]) for c in chunks),
        "preempted_request_ids": (),
        "finished_request_ids": (),
        "rejected_request_ids": (),
        "migrations": (),
        "num_waiting": 0,
        "num_running": len(chunks),
    }


class SchedulerOutputSuite:
    """Building one step's output for 256 requests: frozen slotted dataclasses vs dicts."""

    def setup(self) -> None:
        self.rows = _chunk_args(seed=0, n=256)

    def time_scheduler_output_256(self) -> None:
        _build_types(self.rows, 1)

    def time_plain_dict_baseline_256(self) -> None:
        _build_dicts(self.rows, 1)

    def peakmem_scheduler_output_256(self) -> None:
        _ = [_build_types(self.rows, i) for i in range(64)]

    def peakmem_plain_dict_baseline_256(self) -> None:
        _ = [_build_dicts(self.rows, i) for i in range(64)]

    def track_time_ratio_vs_dict(self) -> float:
        """Time of the dataclasses / time of the dicts, interleaved in one run (best of 7)."""
        types_t = dicts_t = float("inf")
        for _ in range(7):
            types_t = min(types_t, timeit.timeit(lambda: _build_types(self.rows, 1), number=50))
            dicts_t = min(dicts_t, timeit.timeit(lambda: _build_dicts(self.rows, 1), number=50))
        return types_t / dicts_t

    track_time_ratio_vs_dict.unit = "ratio"  # type: ignore[attr-defined]
