"""Peers in the benchmark: interleaved comparison, the worker protocol, the HF export,
the server comparison's plumbing (with a stand-in for guidellm)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from sagellm.engine.bench import peers as P
from sagellm.engine.bench import serve_peers as S
from sagellm.engine.bench.runner import _names, add_bench_arguments, engine_flags
from sagellm.engine.bench.workloads import Workload

TINY = Workload(num_requests=3, prompt_len=8, output_len=3, decode_len=4, prefill_len=24, seed=0)


class FakePeer:
    """A peer whose speed is a constant: checks the figure definitions exactly."""

    def __init__(self, name: str, seconds_per_token: float, max_batch: int | None = None):
        self.name = name
        self.spt = seconds_per_token
        self.max_batch = max_batch
        self.calls: list[tuple[int, int, int]] = []

    def describe(self) -> str:
        return f"{self.name}: fake"

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        self.calls.append((len(prompts), len(prompts[0]), max_tokens))
        # prompt tokens cost the same as generated ones; every call costs 1 ms extra
        work = sum(len(p) for p in prompts) + len(prompts) * max_tokens
        return 0.001 + work * self.spt, len(prompts) * max_tokens

    def close(self) -> None:
        pass


def test_figures_and_interleaving_with_fake_peers() -> None:
    fast, slow = FakePeer("a", 0.001), FakePeer("b", 0.002, max_batch=1)
    comps = P.compare(fast, slow, TINY, 320, rounds=3)
    # the batch-1 peer gets no offline figure
    assert [c.figure for c in comps] == ["decode_b1", "prefill"]
    decode, prefill = comps
    assert len(decode.ours) == len(decode.theirs) == 3
    # decode: (L - 1) / (T(L) - T(1)) = 1 / seconds per token
    assert decode.median_ours == pytest.approx(1000.0)
    assert decode.median_theirs == pytest.approx(500.0)
    assert decode.ratio == pytest.approx(2.0)
    # warm-up + 3 rounds; decode is T(1) and T(L) of two 16-token prompts, prefill T(1)
    decode_calls = [(1, 16, 1), (1, 16, TINY.decode_len)] * 4
    assert fast.calls == decode_calls + [(1, TINY.prefill_len, 1)] * 4
    assert slow.calls == fast.calls
    off = P.compare(fast, FakePeer("c", 0.001), TINY, 320, rounds=2, figures=("offline",))
    assert off[0].figure == "offline" and off[0].ratio == pytest.approx(1.0)
    assert (TINY.num_requests, TINY.prompt_len, TINY.output_len) in fast.calls


def _stopped(pid: int, expected: bool) -> bool:
    """Whether ``pid`` is stopped (state T), waiting up to a second for it to be
    ``expected`` (signals are delivered asynchronously)."""
    import time

    for _ in range(50):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if (state in ("T", "t")) == expected:
            break
        time.sleep(0.02)
    return state in ("T", "t")


class PausablePeer(FakePeer):
    """A fake peer that records when it is paused, resumed and measured."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(name, 0.001)
        self.log = log

    def pause(self) -> None:
        self.log.append(f"pause {self.name}")

    def resume(self) -> None:
        self.log.append(f"resume {self.name}")

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        self.log.append(f"run {self.name}")
        return super().generate(prompts, max_tokens)


def test_the_other_system_is_paused_while_one_is_measured() -> None:
    log: list[str] = []
    a, b = PausablePeer("a", log), PausablePeer("b", log)
    P.compare(a, b, TINY, 320, rounds=1, figures=("prefill",))
    # warm-up and one round, each side measured alone
    once = ["pause b", "run a", "resume b", "pause a", "run b", "resume a"]
    assert log == once * 2


def test_rounds_use_their_own_prompts_and_both_sides_the_same() -> None:
    a = P._prompts(TINY, 320, "prefill", 0)
    b = P._prompts(TINY, 320, "prefill", 1)
    assert a != b and len(a[0]) == TINY.prefill_len
    assert P._prompts(TINY, 320, "prefill", 0) == a
    two = P._prompts(TINY, 320, "decode_b1", 0)
    assert len(two) == 2 and two[0] != two[1]


def test_sagellm_peers_side_by_side(tiny_llm: Any) -> None:
    ours = P.SagellmPeer(tiny_llm)
    other = P.SagellmPeer(tiny_llm, name="same-engine")
    comps = P.compare(ours, other, TINY, tiny_llm.engine.vocab_size, rounds=2)
    assert [c.figure for c in comps] == ["offline", "decode_b1", "prefill"]
    for c in comps:
        assert len(c.ours) == 2 and all(v > 0 for v in c.ours + c.theirs)
    report = {
        "comparisons": [c.as_dict() for c in comps],
        "systems": [ours.describe()],
        "workload": TINY.__dict__,
        "notes": ["a note"],
    }
    table = P.format_comparisons(report)
    assert "offline 3 x 3 (tok/s)" in table and "prefill 24 (tok/s)" in table
    assert "same-engine" in table and "x " in table and "a note" in table


def test_worker_peer_runs_the_engine_in_a_subprocess(tiny_model: Path, tmp_path: Path) -> None:
    # eager kernels: the worker's protocol is under test, not a first start's kernel build
    options = {"dtype": "float32", "num_threads": 1, "max_model_len": 128, "kernels": "eager"}
    peer = P.WorkerPeer(
        "worker",
        sys.executable,
        "sagellm",
        str(tiny_model),
        options=options,
        log_path=tmp_path / "worker.log",
        startup_timeout=600,
    )
    try:
        assert peer.info["backend"] == "sagellm" and peer.info["dtype"] == "float32"
        seconds, n = peer.generate([[5, 6, 7], [8, 9, 10, 11]], 3)
        assert n == 6 and seconds > 0
        with pytest.raises(P.PeerError, match="unknown op"):
            peer.request({"op": "nope"})
        assert peer.generate([[5, 6]], 1)[1] == 1  # still serving after an error
        peer.pause()
        assert _stopped(peer.proc.pid, True)  # stopped while another system is measured
        peer.resume()
        assert not _stopped(peer.proc.pid, False)
        peer.pause()
        assert peer.generate([[5, 6]], 1)[1] == 1  # generate continues a paused worker
    finally:
        peer.close()
    assert peer.proc.returncode == 0


def test_worker_peer_start_failure_quotes_its_log(tmp_path: Path) -> None:
    with pytest.raises(P.PeerError, match="failed to start") as err:
        P.WorkerPeer(
            "broken",
            sys.executable,
            "sagellm",
            str(tmp_path / "no-such-model"),
            log_path=tmp_path / "w.log",
            startup_timeout=120,
        )
    assert "last lines of" in str(err.value)


def test_absent_peers_are_skipped_with_the_install_command(
    tiny_llm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGELLM_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    peers, notes = P.resolve_peers(["vllm", "llama.cpp", "mystery"], tiny_llm)
    assert peers == []
    assert any(n.startswith("vllm skipped") and "nox -s peers" in n for n in notes)
    assert "llama.cpp skipped: the model is not a GGUF file" in notes
    assert any("unknown peer 'mystery'" in n for n in notes)


def test_find_peer_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = tmp_path / ".nox" / "peers-x" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAGELLM_X", raising=False)
    assert P.find_peer_python("peers-x", None, "SAGELLM_X") == venv / "python"
    monkeypatch.setenv("SAGELLM_X", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="SAGELLM_X"):
        P.find_peer_python("peers-x", None, "SAGELLM_X")
    with pytest.raises(FileNotFoundError, match="no "):
        P.find_peer_python("peers-y")


def test_vllm_env_binds_both_cores_and_keeps_explicit_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "3")
    env = P.vllm_env(2)
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "3"
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_USE_AOT_COMPILE"] == "0"
    assert P._cpu_list(1).split("-")[0].isdigit()


def test_hf_export_of_a_gguf_file(tmp_path: Path, tiny_model: Path) -> None:
    import torch

    from sagellm.engine.bench.hf_export import export_hf_folder
    from sagellm.engine.models.config import ModelConfig
    from sagellm.engine.models.loader import load_gguf, load_safetensors
    from sagellm.engine.models.source import resolve_model
    from sagellm.engine.testing import make_tiny_gguf

    gguf_path = make_tiny_gguf(tiny_model, tmp_path / "tiny.gguf")
    source = resolve_model(str(gguf_path))
    folder = export_hf_folder(source, tmp_path / "hf")
    cfg, weights, _, _ = load_gguf(gguf_path)
    cfg2, weights2 = load_safetensors(folder)
    # GGUF stores the epsilon as float32; config.json gets the decimal it stands for
    assert cfg2.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)
    assert dataclasses.replace(cfg2, rms_norm_eps=cfg.rms_norm_eps) == cfg
    assert ModelConfig.from_hf(json.loads((folder / "config.json").read_text())) == cfg2
    assert set(weights2) == set(weights)
    for name, w in weights.items():
        torch.testing.assert_close(weights2[name], w.to(torch.bfloat16).float())
    assert (folder / "tokenizer.json").is_file()
    # cached: a second call writes nothing
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert export_hf_folder(source, tmp_path / "hf") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    # a safetensors model is its own folder
    assert export_hf_folder(resolve_model(str(tiny_model))) == tiny_model.resolve()


# ---------------------------------------------------------------------- server comparison


def _guidellm_report(levels: dict[int, tuple[float, float, float]]) -> dict[str, Any]:
    def stat(mean: float, median: float) -> dict[str, Any]:
        return {"successful": {"mean": mean, "median": median}}

    return {
        "benchmarks": [
            {
                "config": {"strategy": {"type_": "concurrent", "streams": lvl}},
                "metrics": {
                    "output_tokens_per_second": stat(tps, tps * 1.1),
                    "time_to_first_token_ms": stat(ttft * 2, ttft),
                    "inter_token_latency_ms": stat(itl * 2, itl),
                    "request_totals": {"successful": 4, "errored": 0, "total": 4},
                },
            }
            for lvl, (tps, ttft, itl) in levels.items()
        ]
    }


def test_parse_guidellm_and_the_side_by_side_table() -> None:
    ours = S.parse_guidellm(_guidellm_report({1: (20.0, 200.0, 40.0), 8: (90.0, 400.0, 80.0)}))
    assert ours[1] == {
        "output_tok_s": 20.0,
        "ttft_p50_ms": 200.0,
        "itl_p50_ms": 40.0,
        "requests_ok": 4.0,
        "requests_errored": 0.0,
    }
    theirs = S.parse_guidellm(_guidellm_report({1: (40.0, 100.0, 20.0)}))
    report = {
        "servers": {"sagellm": ours, "vllm": theirs},
        "load": S.GuidellmLoad().__dict__,
        "rounds": 1,
        "work_dir": "/tmp/x",
        "notes": [],
    }
    table = S.format_server_table(report)
    lines = table.splitlines()
    assert lines[0].split()[0] == "concurrency"
    row1 = lines[2].split()
    assert row1[0] == "1" and "0.50x" in row1 and "2.00x" in row1
    assert lines[3].split()[0] == "8" and "-" in lines[3].split()


def test_command_lines() -> None:
    load = S.GuidellmLoad(concurrency=(1, 8), requests=4, prompt_tokens=256, output_tokens=16)
    cmd = S.guidellm_command("guidellm", 8123, "m", "/tok", load, "/o.json")
    joined = " ".join(cmd)
    assert "kind=openai_http,target=http://127.0.0.1:8123,model=m" in joined
    assert "kind=synthetic_text,prompt_tokens=256,output_tokens=16" in joined
    assert "profile.streams 1,8" in joined and "kind=max_requests,count=4" in joined
    assert "kind=json,path=/o.json" in joined
    v = S.vllm_serve_command("/py", 9000, "m", "/hf")
    assert v[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert v[v.index("--served-model-name") + 1] == "m"
    s = S.sagellm_serve_command(9001, "m", ["--threads", "2"], python="/py")
    assert s[:4] == ["/py", "-m", "sagellm.engine.cli", "serve"] and s[-2:] == ["--threads", "2"]


def test_bench_flags() -> None:
    from sagellm.engine.args import add_engine_arguments

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    add_bench_arguments(parser)
    args = parser.parse_args(
        ["--peers", "vllm,llama.cpp", "--rounds", "4", "--threads", "2", "--model", "x"]
    )
    assert _names(args.peers) == ["vllm", "llama.cpp"] and args.rounds == 4
    assert args.num_requests is None  # 64 with --peers, 32 without
    assert _names("none") == [] and _names(None) == []
    flags = engine_flags(args)
    assert flags[flags.index("--threads") + 1] == "2" and flags[flags.index("--model") + 1] == "x"


_FAKE_GUIDELLM = """#!{python}
import json, sys, urllib.request
argv = sys.argv[1:]
target = [a for a in argv if a.startswith("kind=openai_http")][0]
url = target.split("target=")[1].split(",")[0]
assert urllib.request.urlopen(url + "/health").status == 200
model = target.split("model=")[1]
body = json.dumps({{"model": model, "messages": [{{"role": "user", "content": "hi"}}],
                   "max_tokens": 2, "ignore_eos": True}}).encode()
req = urllib.request.Request(url + "/v1/chat/completions", body,
                             {{"Content-Type": "application/json"}})
answer = json.load(urllib.request.urlopen(req))
assert answer["usage"]["completion_tokens"] == 2, answer
out = [a for a in argv if a.startswith("kind=json,path=")][0].split("path=")[1]
levels = argv[argv.index("profile.streams") + 1].split(",")
report = {{"benchmarks": [
    {{"config": {{"strategy": {{"streams": int(c)}}}},
     "metrics": {{"output_tokens_per_second": {{"successful": {{"mean": 10.0 * int(c)}}}},
                 "time_to_first_token_ms": {{"successful": {{"median": 100.0}}}},
                 "inter_token_latency_ms": {{"successful": {{"median": 30.0}}}},
                 "request_totals": {{"successful": 4, "errored": 0}}}}}}
    for c in levels]}}
json.dump(report, open(out, "w"))
"""


def test_server_comparison_drives_sagellm_serve(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sagellm serve` as a subprocess, healthy, answering, stopped; guidellm stood in for."""
    fake = tmp_path / "guidellm"
    fake.write_text(_FAKE_GUIDELLM.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("SAGELLM_VLLM_PYTHON", str(tmp_path / "no-vllm"))
    report = S.run_server_peers(
        ["vllm"],
        model=str(tiny_model),
        engine_flags=["--model", str(tiny_model), "--dtype", "float32", "--threads", "1"],
        load=S.GuidellmLoad(concurrency=(1, 2), requests=4, output_tokens=2),
        guidellm=str(fake),
        work_dir=tmp_path / "work",
    )
    assert report["servers"]["sagellm"][2]["output_tok_s"] == 20.0
    assert any(n.startswith("vllm skipped") and "nox -s peers" in n for n in report["notes"])
    assert (tmp_path / "work" / "sagellm-0.log").is_file()
    assert "sagellm out tok/s" in S.format_server_table(report)
