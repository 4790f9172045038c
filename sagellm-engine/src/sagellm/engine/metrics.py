"""Engine stats and their Prometheus publication.

Components count events and return snapshots from ``make_stats()`` (counters reset on
every call); only the engine publishes. :class:`PrometheusPublisher` turns snapshots into
Prometheus series: the engine's own latency samples feed histograms (TTFT, TPOT,
end-to-end), and every numeric field of every component's snapshot is published
generically from :func:`sagellm.core.telemetry.as_flat_dict` as
``sagellm_<component>_<field>`` for gauges (the latest snapshot's value) and
``sagellm_<component>_<field>_total`` for event counters (the snapshots summed).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sagellm.core.telemetry import as_flat_dict

__all__ = ["EngineStats", "PrometheusPublisher", "GAUGE_FIELDS"]


@dataclass(slots=True)
class EngineStats:
    """Snapshot of the engine loop since the previous ``make_stats()``."""

    num_steps: int = 0  # counter
    num_requests_added: int = 0  # counter
    num_requests_finished: int = 0  # counter
    num_requests_aborted: int = 0  # counter
    num_prompt_tokens: int = 0  # counter: prompt tokens of added requests (x n)
    num_generation_tokens: int = 0  # counter: sampled tokens
    num_scheduled_tokens: int = 0  # counter: tokens computed by the runtime
    num_preemptions: int = 0  # counter
    step_seconds: float = 0.0  # counter: wall time spent inside step()
    num_running_requests: int = 0  # gauge: caller requests not finished
    # latency samples of requests finished since the previous snapshot
    ttft_seconds: list[float] = field(default_factory=list)
    tpot_seconds: list[float] = field(default_factory=list)
    e2e_seconds: list[float] = field(default_factory=list)


#: Fields of the core stats classes (and of :class:`EngineStats`) that are gauges; every
#: other numeric field is an event counter reset by ``make_stats()``.
GAUGE_FIELDS = frozenset(
    {
        "num_blocks",
        "num_used_blocks",
        "num_free_blocks",
        "utilization",
        "fragmentation",
        "num_waiting",
        "num_running",
        "num_cached_blocks",
        "lookup_p50_us",
        "lookup_p99_us",
        "hit_rate",
        "num_entries",
        "bucket_accuracy",
        "num_running_requests",
        # tiered prefix cache (sagellm.engine.kv_tiers): blocks below the device tier
        "num_lower_tier_blocks",
        "host_used_blocks",
        "host_blocks",
        "disk_used_blocks",
        "disk_blocks",
        # speculative decoding (sagellm.engine.speculation): rates of the snapshot's drafts
        "acceptance_rate",
        "mean_accepted_length",
        # prefill/decode disaggregation (sagellm.engine.disagg): loads and offers held now
        "num_loading",
        "num_offered",
    }
)

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


def _metric_name(*parts: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", "_".join(p for p in parts if p))


class PrometheusPublisher:
    """Publishes stats snapshots into a private Prometheus registry.

    Usage::

        pub = PrometheusPublisher(model_name="smollm2-135m")
        pub.publish(engine.component_stats())
        text = pub.render()  # the body of GET /metrics
    """

    def __init__(self, model_name: str = "") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self._Counter, self._Gauge = Counter, Gauge
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._labels = {"model_name": model_name}
        names = ["model_name"]
        r = self.registry
        self.ttft = Histogram(
            "sagellm_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            names,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "sagellm_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            names,
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "sagellm_e2e_request_latency_seconds",
            "Time from arrival to the last token",
            names,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.throughput = Gauge(
            "sagellm_generation_throughput_tokens_per_second",
            "Generated tokens per second between the two latest snapshots",
            names,
            registry=r,
        )
        self.prompt_throughput = Gauge(
            "sagellm_prompt_throughput_tokens_per_second",
            "Prompt tokens admitted per second between the two latest snapshots",
            names,
            registry=r,
        )
        self.queue_depth = Gauge(
            "sagellm_num_requests_waiting", "Requests waiting for admission", names, registry=r
        )
        self.running = Gauge(
            "sagellm_num_requests_running", "Requests holding KV blocks", names, registry=r
        )
        self.kv_used = Gauge("sagellm_kv_blocks_used", "KV blocks in use", names, registry=r)
        self.kv_free = Gauge("sagellm_kv_blocks_free", "KV blocks free", names, registry=r)
        self.preemptions = Counter(
            "sagellm_num_preemptions", "Requests preempted (recomputed later)", names, registry=r
        )
        self.generation_tokens = Counter(
            "sagellm_generation_tokens", "Generated tokens", names, registry=r
        )
        self.prompt_tokens = Counter("sagellm_prompt_tokens", "Prompt tokens", names, registry=r)
        self._generic: dict[str, Any] = {}
        self._last_time: float | None = None

    def _series(self, kind: str, name: str, doc: str) -> Any:
        key = f"{kind}:{name}"
        metric = self._generic.get(key)
        if metric is None:
            cls = self._Gauge if kind == "gauge" else self._Counter
            metric = cls(name, doc, ["model_name"], registry=self.registry)
            self._generic[key] = metric
        return metric.labels(**self._labels)

    def publish(self, snapshots: dict[str, object]) -> None:
        """Fold one round of ``make_stats()`` snapshots (component name -> stats) in."""
        with self._lock:
            now = time.monotonic()
            interval = None if self._last_time is None else now - self._last_time
            self._last_time = now
            labels = self._labels
            engine = snapshots.get("engine")
            if isinstance(engine, EngineStats):
                for v in engine.ttft_seconds:
                    self.ttft.labels(**labels).observe(v)
                for v in engine.tpot_seconds:
                    self.tpot.labels(**labels).observe(v)
                for v in engine.e2e_seconds:
                    self.e2e.labels(**labels).observe(v)
                self.generation_tokens.labels(**labels).inc(engine.num_generation_tokens)
                self.prompt_tokens.labels(**labels).inc(engine.num_prompt_tokens)
                if interval:
                    self.throughput.labels(**labels).set(engine.num_generation_tokens / interval)
                    self.prompt_throughput.labels(**labels).set(engine.num_prompt_tokens / interval)
            sched = snapshots.get("scheduler")
            if sched is not None:
                self.queue_depth.labels(**labels).set(getattr(sched, "num_waiting", 0))
                self.running.labels(**labels).set(getattr(sched, "num_running", 0))
                self.preemptions.labels(**labels).inc(getattr(sched, "num_preemptions", 0))
            pool = snapshots.get("kv_pool")
            if pool is not None:
                self.kv_used.labels(**labels).set(getattr(pool, "num_used_blocks", 0))
                self.kv_free.labels(**labels).set(getattr(pool, "num_free_blocks", 0))
            for component, stats in snapshots.items():
                self._publish_generic(component, stats)

    def _publish_generic(self, component: str, stats: object) -> None:
        items: list[tuple[str, object]] = []
        if isinstance(stats, (list, tuple)):  # e.g. one TierStats per tier
            for i, s in enumerate(stats):
                tier = getattr(s, "tier", "") or str(i)
                items.append((f"{component}_{tier}", s))
        else:
            items.append((component, stats))
        for prefix, s in items:
            try:
                flat = as_flat_dict(s)
            except TypeError:
                continue
            for key, value in flat.items():
                base = _metric_name("sagellm", prefix, key)
                if key in GAUGE_FIELDS:
                    self._series("gauge", base, f"{prefix}.{key} (latest snapshot)").set(value)
                elif value >= 0:
                    # prometheus_client appends _total to counter names
                    self._series("counter", base, f"{prefix}.{key} (summed snapshots)").inc(value)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        from prometheus_client import generate_latest

        with self._lock:
            return generate_latest(self.registry)
