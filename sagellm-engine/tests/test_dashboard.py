"""The shipped Grafana dashboard queries only metrics the server exports."""

from __future__ import annotations

import json
import re
from importlib import resources

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sagellm.engine.async_engine import AsyncLLMEngine
from sagellm.engine.config import ServerConfig
from sagellm.engine.server import ServerThread, build_app

from .conftest import make_llm

_METRIC = re.compile(r"\b(sagellm_[A-Za-z0-9_]+)")


def _dashboard() -> dict:
    path = resources.files("sagellm.engine.server") / "dashboards" / "sagellm.json"
    return json.loads(path.read_text())


def _queried_names(dashboard: dict) -> set[str]:
    names: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names.update(_METRIC.findall(target["expr"]))
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            names.update(_METRIC.findall(query["query"]))
    return names


@pytest.mark.integration  # needs sagellm-speculative for the speculative panels
def test_dashboard_metrics_are_exported(tiny_model) -> None:
    # the speculative panels need drafts: an ngram proposer from sagellm-speculative
    pytest.importorskip(
        "sagellm.speculative", reason="needs sagellm-speculative (nox -s integration runs it)"
    )
    llm = make_llm(
        tiny_model,
        num_blocks=128,
        speculative_config={
            "method": "ngram",
            "disable_by_batch_size": 1000,
            "min_acceptance_rate": 0.0,
        },
    )
    with ServerThread(build_app(AsyncLLMEngine(llm.engine)), ServerConfig(port=0)) as srv:
        body = {"model": llm.engine.model_name, "prompt": "a b a b a b", "max_tokens": 6}
        for _ in range(2):
            assert httpx.post(srv.url + "/v1/completions", json=body, timeout=60).is_success
        text = httpx.get(srv.url + "/metrics", timeout=60).text
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    dashboard = _dashboard()
    queried = _queried_names(dashboard)
    # what the dashboard is for: latency, throughput, KV, prefix hits, speculation, SLOs
    for name in (
        "sagellm_time_to_first_token_seconds_bucket",
        "sagellm_time_per_output_token_seconds_bucket",
        "sagellm_generation_tokens_total",
        "sagellm_kv_pool_utilization",
        "sagellm_scheduler_num_prefix_hit_tokens_total",
        "sagellm_speculative_acceptance_rate",
        "sagellm_scheduler_num_slo_met_total",
    ):
        assert name in queried, name
    missing = sorted(queried - exported)
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
