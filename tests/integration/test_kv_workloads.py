"""The KV workloads of `sagellm bench` run end to end on a tiny model and report every
installed component side by side."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm.core import registry

pytest.importorskip("sagellm.engine")

from sagellm.engine.bench import kv_workloads  # noqa: E402


@pytest.fixture(scope="module")
def wide_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose vocabulary covers the workloads' token ids (< 40000)."""
    from sagellm.engine.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("wide-tiny"), vocab_size=40_000, seed=0)


@pytest.fixture(autouse=True)
def float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(kv_workloads.ENGINE_OPTIONS, "dtype", "float32")


def _rows(report: str) -> dict[str, list[str]]:
    """Table rows of a report by their first cell."""
    rows = {}
    for line in report.splitlines()[1:]:
        cells = [c for c in line.split("  ") if c.strip()]
        rows[cells[0].strip()] = [c.strip() for c in cells[1:]]
    return rows


def test_eviction_workload_reports_every_policy_with_unchanged_tokens(
    wide_tiny_model: Path,
) -> None:
    n = 12
    report = kv_workloads.bench_eviction(
        model=str(wide_tiny_model),
        threads=1,
        num_requests=n,
        num_tenants=3,
        system_len=48,
        num_templates=2,
        template_len=32,
        user_len=8,
        one_off_len=64,
        num_blocks=16,
    )
    rows = _rows(report)
    policies = sorted(p.name for p in registry.available("eviction"))
    expected = {"no prefix cache", "built-in LRU", *policies}
    if "cost_aware" in policies and registry.available("lifetime"):
        expected.add(f"cost_aware + {sorted(p.name for p in registry.available('lifetime'))[0]}")
    assert set(rows) == {"eviction", *expected}
    for name in expected:
        assert rows[name][-1] == f"{n}/{n}", f"{name}: greedy tokens changed"
    assert rows["no prefix cache"][0] == "-"
    for name in expected - {"no prefix cache"}:
        hit_ratio, _, hits, evicted = rows[name][:4]
        assert 0.0 < float(hit_ratio) < 1.0
        assert int(evicted) > 0, f"{name}: the pool never filled"
    assert rows["built-in LRU"][1] == "1.00x"
