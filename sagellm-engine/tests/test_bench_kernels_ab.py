"""The kernel A/B benchmark: specs interleaved per round, medians and ratios."""

from __future__ import annotations

from typing import Any

import pytest

from sagellm.engine.bench import kernels_ab


def test_rounds_interleave_the_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    values = {"a": iter([100.0, 110.0, 90.0]), "b": iter([150.0, 160.0, 140.0])}

    def fake_offline(llm: Any, workload: Any) -> dict[str, float]:
        order.append(llm)
        v = next(values[llm])
        return {"throughput_tok_s": v, "prefill_tok_s": 2 * v}

    monkeypatch.setattr("sagellm.engine.bench.workloads.sagellm_offline", fake_offline)
    runs = kernels_ab.compare({"a": "a", "b": "b"}, workload=None, rounds=3)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert runs["a"]["throughput_tok_s"] == [100.0, 110.0, 90.0]
    assert runs["b"]["prefill_tok_s"] == [300.0, 320.0, 280.0]
    assert runs["a"]["decode_b1_tok_s"] == []


def test_refuses_the_same_spec_twice(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        kernels_ab.main(["--a", "fused", "--b", "fused"])
    assert "--a and --b name the same spec" in capsys.readouterr().err
