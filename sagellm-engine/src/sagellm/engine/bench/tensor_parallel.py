"""Tensor parallelism measured against its alpha-beta model, on one host and across two.

The model is a random Llama of the embedded model's size with heads that two ranks
split (30 layers, hidden 512, 8 query heads and 2 KV heads of 64, MLP 1536, vocabulary
49,152; float32). Each configuration runs in its own processes, one after the other:

- ``tp1 x1`` and ``tp1 x2``: one process with 1 and 2 threads;
- ``tp2 shm``: two ranks on this host (1 thread each), all-reduces in shared memory;
- ``tp2 2 hosts``: rank 0 and a ``sagellm tp-worker`` in two network namespaces joined by
  a veth pair (root only), shared memory off, so every collective crosses the link over
  TCP as between two hosts.

Each measures a batch-1 decode step, an 8-row decode step (time per output token of 1
and of 8 concurrent requests) and a 256-token prefill (its TTFT). The collectives of
each link are measured alone in the same run (gloo all-reduce and all-gather at the
sizes a step uses, and shared memory on one host). sagellm-topology's ``fit_alpha_beta``
fits ``t = alpha + bytes / beta`` to them. The prediction of a TP step is then half of
the one-thread step, plus ``2 x layers + 1`` all-reduces of ``rows x hidden`` float32,
plus one all-gather of the logits' halves, plus sending the plan.

Usage::

    python -m sagellm.engine.bench.tensor_parallel [--json tp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

SHAPE: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_layers": 30,
    "num_heads": 8,
    "num_kv_heads": 2,
}
ENGINE = {"dtype": "float32", "max_model_len": 1024, "seed": 0, "num_blocks": 512}


# ---------------------------------------------------------------------- in a rank-0 process


def _seconds(start: float | None, end: float | None) -> float:
    if start is None or end is None:
        raise RuntimeError("a request finished without its token times")
    return end - start


def _measure(spec: dict[str, Any]) -> dict[str, float]:
    """Build the engine ``spec`` describes and time its decode and prefill steps."""
    from sagellm.core.types import SamplingParams
    from sagellm.engine.llm import LLM

    options: dict[str, Any] = {**ENGINE, **spec["options"]}
    llm = LLM(model=spec["model"], **options)
    try:
        prompt = [{"prompt_token_ids": list(range(300, 332))}]
        llm.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True))  # warm

        def tpot(n: int, reps: int = 3) -> float:
            vals = []
            for r in range(reps):
                batch = [
                    {"prompt_token_ids": list(range(400 + 50 * i + r, 432 + 50 * i + r))}
                    for i in range(n)
                ]
                outs = llm.generate(batch, SamplingParams(max_tokens=48, ignore_eos=True))
                per = [
                    _seconds(o.metrics.first_token_time, o.metrics.finished_time) / 47 for o in outs
                ]
                vals.append(statistics.median(per))
            return 1e3 * statistics.median(vals)

        def prefill(reps: int = 5) -> float:
            vals = []
            for r in range(reps):
                ids = [(7 * i + r) % 40000 + 300 for i in range(256)]
                (out,) = llm.generate(
                    [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, ignore_eos=True)
                )
                vals.append(_seconds(out.metrics.arrival_time, out.metrics.first_token_time))
            return 1e3 * statistics.median(vals)

        return {"decode_1": tpot(1), "decode_8": tpot(8), "prefill_256": prefill()}
    finally:
        llm.engine.close()


def _collectives(rank: int, world: int, init: str, shm: bool) -> dict[str, float]:
    """Median microseconds of the step's collectives between ``world`` ranks."""
    import torch

    from sagellm.core import registry

    torch.set_num_threads(1)  # as each rank of the measured steps
    comm = registry.load(
        "comm_backend", "torch", {"shm": shm}, rank=rank, world_size=world, init_method=init
    )
    h, v = SHAPE["hidden_size"], SHAPE["vocab_size"]
    work = torch.randn(256, 256)
    out: dict[str, float] = {}
    try:
        for rows in (1, 8, 256):
            x = torch.randn(rows, h)
            for mode in ("hot", "after_compute"):
                ts = []
                for i in range(60):
                    comm.barrier()
                    if mode == "after_compute":
                        # a step computes about a millisecond between two collectives: the
                        # communication threads have gone idle by then
                        t_end = time.perf_counter() + 0.7e-3
                        while time.perf_counter() < t_end:
                            work @ work
                    t0 = time.perf_counter()
                    comm.all_reduce(x)
                    if i >= 10:
                        ts.append(time.perf_counter() - t0)
                key = "all_reduce" if mode == "after_compute" else "all_reduce_hot"
                out[f"{key}_{rows * h * 4}"] = 1e6 * statistics.median(ts)
        for rows in (1, 8):
            local = torch.randn(rows, v // world)
            gathered = torch.empty(world * rows, v // world)
            ts = []
            for i in range(40):
                comm.barrier()
                t0 = time.perf_counter()
                comm.all_gather(gathered, local)
                if i >= 10:
                    ts.append(time.perf_counter() - t0)
            out[f"all_gather_{rows}"] = 1e6 * statistics.median(ts)
        small = torch.zeros(1, dtype=torch.int64)
        ts = []
        for i in range(60):
            comm.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                comm.send(small, 1)
            elif rank == 1:
                comm.recv(small, 0)
            if i >= 10:
                ts.append(time.perf_counter() - t0)
        out["send"] = 1e6 * statistics.median(ts)
    finally:
        comm.close()
    return out


# ---------------------------------------------------------------------- orchestration


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if proc.returncode:
        raise RuntimeError(f"{cmd[:6]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def _result(stdout: str) -> dict[str, Any]:
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    out: dict[str, Any] = json.loads(line[7:])
    return out


def _self(*args: str) -> list[str]:
    return [sys.executable, "-m", "sagellm.engine.bench.tensor_parallel", *args]


class _Namespaces:
    """Two network namespaces joined by a veth pair (10.78.0.1 and 10.78.0.2)."""

    def __init__(self) -> None:
        tag = f"tpb{os.getpid() % 100000}"
        self.a, self.b = f"{tag}a", f"{tag}b"
        self.dev_a, self.dev_b = f"{tag}va", f"{tag}vb"
        self.addr_a, self.addr_b = "10.78.0.1", "10.78.0.2"

    def __enter__(self) -> _Namespaces:
        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

        try:
            ip("netns", "add", self.a)
            ip("netns", "add", self.b)
            ip("link", "add", self.dev_a, "type", "veth", "peer", "name", self.dev_b)
            for ns, dev, addr in (
                (self.a, self.dev_a, self.addr_a),
                (self.b, self.dev_b, self.addr_b),
            ):
                ip("link", "set", dev, "netns", ns)
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

    def run_pair(self, cmd_a: list[str], cmd_b: list[str], timeout: float = 900) -> str:
        """Run ``cmd_a`` in namespace a and ``cmd_b`` in b; ``cmd_a``'s stdout."""
        env_b = {**os.environ, "GLOO_SOCKET_IFNAME": self.dev_b}
        pb = subprocess.Popen(
            ["ip", "netns", "exec", self.b, *cmd_b],
            env=env_b,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            return _run(
                ["ip", "netns", "exec", self.a, *cmd_a],
                env={"GLOO_SOCKET_IFNAME": self.dev_a},
                timeout=timeout,
            )
        finally:
            try:
                pb.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pb.kill()
                pb.wait(timeout=10)


def _free_port() -> int:
    from sagellm.core.ports import find_free_port

    return find_free_port()


def _predict(one_thread_ms: float, rows: int, coll: dict[str, float], fit: Any) -> float:
    """Half of the one-thread step plus the step's collectives (microseconds -> ms)."""
    h, layers = SHAPE["hidden_size"], SHAPE["num_layers"]
    all_reduce_us = fit.time_us(rows * h * 4)
    gather_us = coll.get(f"all_gather_{min(rows, 8)}", 0.0)
    us = (2 * layers + 1) * all_reduce_us + gather_us + 2 * coll["send"]
    return one_thread_ms / 2 + us / 1e3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sagellm.engine.bench.tensor_parallel",
        description="Tensor-parallel step times on one host and across two network "
        "namespaces, next to the alpha-beta model's prediction.",
    )
    sub = p.add_subparsers(dest="mode")
    m = sub.add_parser("measure", help="(internal) time one configuration")
    m.add_argument("spec")
    c = sub.add_parser("collectives", help="(internal) one rank of the collective timings")
    c.add_argument("--rank", type=int, required=True)
    c.add_argument("--init", required=True)
    c.add_argument("--shm", action="store_true")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--work-dir", help="where the random model goes (default: a temp folder)")
    p.add_argument("--no-netns", action="store_true", help="skip the two-namespace runs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "measure":
        print("RESULT " + json.dumps(_measure(json.loads(args.spec))), flush=True)
        return 0
    if args.mode == "collectives":
        out = _collectives(args.rank, 2, args.init, args.shm)
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    from sagellm.engine.testing import make_tiny_llama
    from sagellm.topology.costs import fit_alpha_beta

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sagellm-bench-tp-"))
    model = make_tiny_llama(work / "model", seed=0, **SHAPE)
    netns = (
        not args.no_netns
        and sys.platform == "linux"
        and os.geteuid() == 0
        and shutil.which("ip") is not None
    )
    results: dict[str, dict[str, float]] = {}
    coll: dict[str, dict[str, float]] = {}

    def measure(name: str, options: dict[str, Any]) -> None:
        print(f"[tp] {name}", file=sys.stderr, flush=True)
        spec = json.dumps({"model": str(model), "options": options})
        results[name] = _result(_run(_self("measure", spec)))

    measure("tp1 x1", {"num_threads": 1})
    measure("tp1 x2", {"num_threads": 2})
    measure("tp2 shm", {"num_threads": 2, "tensor_parallel_size": 2})
    print("[tp] collectives, one host", file=sys.stderr, flush=True)
    init = f"tcp://127.0.0.1:{_free_port()}"
    peer = subprocess.Popen(
        _self("collectives", "--rank", "1", "--init", init, "--shm"),
        stdout=subprocess.DEVNULL,
    )
    try:
        coll["shm"] = _result(_run(_self("collectives", "--rank", "0", "--init", init, "--shm")))
    finally:
        peer.wait(timeout=60)
    if netns:
        with _Namespaces() as ns:
            print("[tp] collectives, two hosts", file=sys.stderr, flush=True)
            init = f"tcp://{ns.addr_a}:{_free_port()}"
            coll["tcp"] = _result(
                ns.run_pair(
                    _self("collectives", "--rank", "0", "--init", init),
                    _self("collectives", "--rank", "1", "--init", init),
                )
            )
            print("[tp] tp2 2 hosts", file=sys.stderr, flush=True)
            port = _free_port()
            options = {
                "num_threads": 1,
                "tensor_parallel_size": 2,
                "tensor_parallel_workers": "external",
                "master_addr": ns.addr_a,
                "master_port": port,
                "runtime": {"name": "native", "options": {"comm_options": {"shm": False}}},
            }
            spec = json.dumps({"model": str(model), "options": options})
            yaml = work / "worker.yaml"
            yaml.write_text(
                "runtime:\n  name: native\n  options:\n    comm_options:\n      shm: false\n"
            )
            worker = [sys.executable, "-m", "sagellm.engine.cli", "tp-worker", "--rank", "1"]
            worker += ["--model", str(model), "--dtype", "float32", "--threads", "1"]
            worker += ["--max-model-len", "1024", "--num-blocks", "512", "--seed", "0"]
            worker += ["--tensor-parallel-size", "2", "--master-addr", ns.addr_a]
            worker += ["--master-port", str(port), "--config", str(yaml)]
            results["tp2 2 hosts"] = _result(ns.run_pair(_self("measure", spec), worker))

    fits = {}
    for link, c in coll.items():
        sizes = [
            int(k.rsplit("_", 1)[1])
            for k in c
            if k.startswith("all_reduce_") and not k.startswith("all_reduce_hot")
        ]
        times = [c[f"all_reduce_{s}"] for s in sizes]
        fits[link] = fit_alpha_beta(sizes, times)
    base = results["tp1 x1"]
    rows_of = {"decode_1": 1, "decode_8": 8, "prefill_256": 256}
    print(
        f"random Llama, {SHAPE['num_layers']} layers, hidden {SHAPE['hidden_size']}, "
        f"{SHAPE['num_heads']}/{SHAPE['num_kv_heads']} heads, float32; ms per step"
    )
    print("| configuration | decode, 1 row | decode, 8 rows | prefill, 256 tokens |")
    print("|---|---|---|---|")
    table: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        table[name] = dict(r)
        print(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in rows_of) + " |")
        link = {"tp2 shm": "shm", "tp2 2 hosts": "tcp"}.get(name, "")
        if link in fits:
            pred = {
                k: _predict(base[k], rows, coll[link], fits[link]) for k, rows in rows_of.items()
            }
            table[name + " predicted"] = pred
            print(f"| {name}, predicted | " + " | ".join(f"{pred[k]:.2f}" for k in rows_of) + " |")
    for link, f in fits.items():
        c = coll[link]
        print(
            f"{link}: all-reduce after compute: alpha {f.alpha_us:.1f} us, beta "
            f"{f.beta_gbps:.2f} GB/s (2 KiB {c['all_reduce_2048']:.1f} us, 16 KiB "
            f"{c['all_reduce_16384']:.1f} us, 512 KiB {c['all_reduce_524288']:.1f} us; back to "
            f"back: {c['all_reduce_hot_2048']:.1f}, {c['all_reduce_hot_16384']:.1f}, "
            f"{c['all_reduce_hot_524288']:.1f} us); all-gather of 1 row's logits "
            f"{c['all_gather_1']:.1f} us; a small send {c['send']:.1f} us"
        )
    if not netns:
        print("note: the two-namespace runs need root and iproute2; skipped")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "steps_ms": table,
                    "collectives_us": coll,
                    "fits": {k: [f.alpha_us, f.beta_gbps] for k, f in fits.items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
