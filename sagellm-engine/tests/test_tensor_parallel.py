"""Tensor parallelism: ranks in worker processes, their outputs against one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm.core.errors import ConfigError
from sagellm.core.ports import find_free_port
from sagellm.core.types import SamplingParams
from sagellm.engine.llm import LLM
from sagellm.engine.runtime.tensor_parallel import TensorParallelError

from .conftest import make_llm

pytest.importorskip("sagellm.collective_ops")
pytestmark = pytest.mark.integration  # needs sagellm-collective-ops

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 40)]


def tokens(llm: LLM, prompts: list[dict[str, Any]] = PROMPTS) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)]


def gone(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> list[list[int]]:
    return tokens(make_llm(tiny_model, num_blocks=64, num_threads=2))


def test_two_ranks_match_one_process(tiny_model: Path, reference: list[list[int]]) -> None:
    llm = make_llm(
        tiny_model,
        num_blocks=64,
        num_threads=2,
        tensor_parallel_size=2,
        max_num_batched_tokens=16,  # the 40-token prompt is prefilled in chunks
        prefix_cache="radix",
    )
    runtime = llm.engine.runtime
    try:
        (worker,) = runtime._tp.procs
        assert runtime.model_config.num_heads == 2 and runtime.model_config.num_kv_heads == 1
        assert llm.engine.kv_pool.schema.num_kv_heads == 1  # each rank stores its KV heads
        assert tokens(llm) == reference
        assert tokens(llm) == reference  # again, from the prefix cache
    finally:
        llm.engine.close()
    assert gone(worker)


def test_quantizers_quantize_each_rank_s_slices(tiny_model: Path) -> None:
    llm = make_llm(
        tiny_model, num_blocks=64, num_threads=2, tensor_parallel_size=2, quantization="int8"
    )
    try:
        model = llm.engine.runtime.model
        layer = model.layers[0]
        assert layer.qkv_proj.method.name.startswith("int8")
        assert layer.down_proj.method.name.startswith("int8")
        assert (layer.down_proj.input_size, layer.gate_up_proj.output_sizes) == (64, (64, 64))
        out = tokens(llm)
        assert [len(t) for t in out] == [GREEDY.max_tokens] * len(PROMPTS)
    finally:
        llm.engine.close()


@pytest.mark.parametrize("weight_type", ["Q4_1", "Q8_0"])
def test_gguf_blocks_are_split_between_the_ranks(
    tiny_model: Path, tmp_path: Path, weight_type: str
) -> None:
    """Each rank computes on its slice of the checkpoint's blocks (no float fallback): the
    column-parallel projections keep their rows' blocks, the row-parallel ones the
    blocks of their input columns, the head its vocabulary rows."""
    from sagellm.engine.testing import make_tiny_gguf

    path = make_tiny_gguf(tiny_model, tmp_path / "tiny.gguf", weight_type=weight_type)
    one = make_llm(path, num_blocks=64, num_threads=2)
    two = make_llm(path, num_blocks=64, num_threads=2, tensor_parallel_size=2)
    try:
        assert one.engine.runtime.quantization == two.engine.runtime.quantization == "gguf"
        full, half = one.engine.runtime.model, two.engine.runtime.model
        for proj in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            a, b = getattr(full.layers[0], proj), getattr(half.layers[0], proj)
            assert b.method.name == a.method.name and b.method.name.startswith("gguf")
        assert half.layers[0].o_proj.input_size == 32  # 2 of 4 heads of 16
        assert half.layers[0].down_proj.input_size == 64  # half of the MLP's 128
        assert half.lm_head.method.name == full.lm_head.method.name
        # rank 0's head holds the first half of the vocabulary's rows, exactly (Q8_0: its
        # blocks as stored; Q4_1: int8 groups of 32 re-rounded from them)
        head, full_head = half.lm_head, full.lm_head
        if weight_type == "Q8_0":
            assert torch.equal(head.block_codes, full_head.block_codes[:160])
            assert torch.equal(head.block_scales, full_head.block_scales[:160])
        else:
            assert torch.equal(head.qweight, full_head.qweight[:, :160])
        if weight_type == "Q4_1":
            # rank 0's down_proj: the blocks of the first 64 of 128 input columns
            down, full_down = half.layers[0].down_proj, full.layers[0].down_proj
            assert torch.equal(down.block_codes, full_down.block_codes[:, :32])
            assert tokens(two) == tokens(one)
        # Q8_0 projections are re-rounded to int8 with one scale per row of the weight a
        # rank holds (half a row for the row-parallel ones): close to one process, not equal
    finally:
        two.engine.close()


def test_a_dead_worker_fails_the_step_with_its_rank(tiny_model: Path) -> None:
    llm = make_llm(
        tiny_model,
        num_blocks=64,
        num_threads=2,
        tensor_parallel_size=2,
        runtime={"name": "native", "options": {"tensor_parallel_timeout_s": 5.0}},
    )
    engine = llm.engine
    try:
        (worker,) = engine.runtime._tp.procs
        engine.add_request("a", list(range(5, 30)), GREEDY)
        engine.step()
        os.kill(worker.pid, signal.SIGKILL)
        assert gone(worker)
        with pytest.raises(TensorParallelError, match="rank 1 exited with code -9; restart"):
            engine.step()
        with pytest.raises(TensorParallelError, match="rank 1 exited"):  # and every later one
            engine.step()
        engine.abort_request("a")
        pool = engine.kv_pool
        assert pool.num_free_blocks == pool.num_blocks
    finally:
        engine.close()


def test_a_worker_killed_mid_step_fails_the_step_at_once(tiny_model: Path) -> None:
    """Rank 0 inside a step's collectives when its peer dies: the shared-memory wait sees
    the exit (not the collective timeout, 60 s by default)."""
    llm = make_llm(tiny_model, num_blocks=64, num_threads=2, tensor_parallel_size=2)
    engine = llm.engine
    try:
        (worker,) = engine.runtime._tp.procs
        engine.add_request("a", list(range(5, 30)), GREEDY)
        plan = engine.scheduler.build_plan(engine.scheduler.schedule())
        os.kill(worker.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) exited during a shared"):
            engine.runtime.execute_local(plan)  # rank 0's part of the step
        assert time.monotonic() - t0 < 5.0
    finally:
        engine.close()
    assert gone(worker)


def test_sizes_the_model_cannot_split_are_refused(tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match="does not divide the model's 4 query heads"):
        make_llm(tiny_model, num_blocks=64, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="sparsity with tensor_parallel_size > 1"):
        make_llm(tiny_model, num_blocks=64, tensor_parallel_size=2, sparsity="magnitude")
    with pytest.raises(ConfigError, match="needs a master_port every rank knows"):
        make_llm(
            tiny_model, num_blocks=64, tensor_parallel_size=2, tensor_parallel_workers="external"
        )


# ---------------------------------------------------------------------- two "hosts"

RANK0 = textwrap.dedent(
    """
    import json, sys
    from sagellm.engine.llm import LLM
    from sagellm.core.types import SamplingParams
    model, addr, port, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    llm = LLM(model=model, dtype="float32", block_size=4, num_threads=1, max_model_len=256,
              num_blocks=64, seed=0, tensor_parallel_size=2, tensor_parallel_workers="external",
              master_addr=addr, master_port=port,
              runtime={"name": "native", "options": {"comm_options": {"shm": False}}})
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
    llm.engine.close()
    """
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 to create network namespaces",
)
def test_ranks_in_two_network_namespaces(
    tiny_model: Path, reference: list[list[int]], tmp_path: Path
) -> None:
    """Rank 0 and a `sagellm tp-worker` in two namespaces joined by a veth pair: the
    collectives cross the link over TCP (shared memory off, as between two hosts)."""
    tag = f"sg{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        try:
            _ip("netns", "add", a)
            _ip("netns", "add", b)
            _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
            _ip("link", "set", f"{tag}va", "netns", a)
            _ip("link", "set", f"{tag}vb", "netns", b)
            for ns, dev, addr in (
                (a, f"{tag}va", "10.77.0.1/24"),
                (b, f"{tag}vb", "10.77.0.2/24"),
            ):
                _ip("-n", ns, "addr", "add", addr, "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc.stderr!r}")
        port = find_free_port()
        script = tmp_path / "rank0.py"
        script.write_text(RANK0)
        with (
            open(tmp_path / "rank0.log", "w+b") as log0,
            open(tmp_path / "rank1.log", "wb") as log1,
        ):
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", a, sys.executable, str(script), str(tiny_model)]
                    + ["10.77.0.1", str(port), json.dumps(PROMPTS)],
                    stdout=log0,
                    stderr=subprocess.STDOUT,
                    # gloo's pairs bind to the hostname's address (loopback here) unless told
                    env={**os.environ, "GLOO_SOCKET_IFNAME": f"{tag}va"},
                )
            )
            worker = [sys.executable, "-m", "sagellm.engine.cli", "tp-worker", "--rank", "1"]
            worker += ["--model", str(tiny_model), "--dtype", "float32", "--block-size", "4"]
            worker += ["--threads", "1", "--max-model-len", "256", "--tensor-parallel-size", "2"]
            worker += ["--master-addr", "10.77.0.1", "--master-port", str(port)]
            config = tmp_path / "worker.yaml"
            config.write_text(
                "runtime:\n  name: native\n  options:\n    comm_options:\n      shm: false\n"
            )
            worker += ["--config", str(config)]
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", b, *worker],
                    stdout=log1,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "GLOO_SOCKET_IFNAME": f"{tag}vb"},
                )
            )
            deadline = time.monotonic() + 120
            while procs[0].poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            log0.seek(0)
            out = log0.read().decode(errors="replace")
            assert procs[0].returncode == 0, out[-2000:]
            line = next(x for x in out.splitlines() if x.startswith("TOKENS "))
            assert json.loads(line[7:]) == reference
            assert gone(procs[1], timeout=15)  # the worker ends with rank 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
