"""Tensor parallelism of the native runtime: worker processes and what rank 0 tells them.

Rank 0 is the engine's runtime: the scheduler, the pool's bookkeeping and the sampler
stay in its process. Ranks ``1..N-1`` are worker processes, each holding its slice of the
model (:mod:`sagellm.engine.models.shard`) and its own KV storage of the same block ids
(its slice of the KV heads). Every step rank 0 sends each worker the step's
``ExecutionPlan`` (pickled, over the comm backend's point-to-point ``send``), then every
rank runs the same forward pass, whose all-reduces and all-gather join them; the gathered
logits are used on rank 0 only.

Workers are started by rank 0 on its host (``tensor_parallel_workers="spawn"``, the
default), or by ``sagellm tp-worker --rank R ...`` on other hosts
(``"external"``); every rank meets at ``master_addr:master_port`` through
torch.distributed's TCP rendezvous. A worker whose rank 0 goes away exits (its next
receive fails); a worker that dies makes rank 0's step raise, and every later step
raise at once, naming the rank, so the engine fails the requests in flight and frees
their blocks.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from sagellm.core import registry
from sagellm.core.errors import ConfigError, SageLLMError

__all__ = ["TensorParallelError", "TensorParallelGroup", "serve_worker", "worker_main"]

logger = logging.getLogger(__name__)


class TensorParallelError(SageLLMError):
    """A tensor-parallel rank is gone or failed a step; the engine must be restarted."""


def _send_obj(comm: Any, obj: Any, dst: int) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    comm.send(torch.tensor([len(data)], dtype=torch.int64), dst)
    comm.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst)


def _recv_obj(comm: Any, src: int) -> Any:
    size = torch.empty(1, dtype=torch.int64)
    comm.recv(size, src)
    buf = torch.empty(int(size.item()), dtype=torch.uint8)
    comm.recv(buf, src)
    return pickle.loads(buf.numpy().tobytes())


def make_comm(config: Any, rank: int) -> Any:
    """The comm backend joining every rank (rendezvous at ``master_addr:master_port``)."""
    options = {"timeout_s": config.tensor_parallel_timeout_s, **config.comm_options}
    try:
        return registry.load(
            "comm_backend",
            config.comm_backend,
            options,
            rank=rank,
            world_size=config.tensor_parallel_size,
            init_method=f"tcp://{config.master_addr}:{config.master_port}",
        )
    except Exception as exc:
        raise TensorParallelError(
            f"rank {rank} of {config.tensor_parallel_size} could not join the group at "
            f"{config.master_addr}:{config.master_port} ({type(exc).__name__}: {exc}); check "
            "that every rank runs and can reach the master address"
        ) from exc


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


class TensorParallelGroup:
    """Rank 0's side: starts the local workers and sends them every step's work."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.world = int(config.tensor_parallel_size)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broken: str | None = None
        if config.tensor_parallel_workers == "spawn":
            payload = json.dumps(config.model_dump(mode="json"))
            env = {**os.environ, "SAGELLM_TP_CONFIG": payload}
            for rank in range(1, self.world):
                cmd = [sys.executable, "-m", "sagellm.engine.runtime.tensor_parallel"]
                cmd += ["--rank", str(rank)]
                self.procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
        self._finalizer = weakref.finalize(self, _stop, self.procs)
        self.comm: Any = None

    def join(self) -> Any:
        """Join the group as rank 0 (after the workers were started)."""
        try:
            self.comm = make_comm(self.config, 0)
        except BaseException:
            self.close()
            raise
        return self.comm

    def check(self) -> None:
        """Raise TensorParallelError when a worker has exited (or a step failed before)."""
        for rank, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code is not None and self.broken is None:
                self.broken = f"tensor-parallel rank {rank} exited with code {code}"
        if self.broken is not None:
            raise TensorParallelError(f"{self.broken}; restart the engine")

    def send(self, message: tuple[Any, ...]) -> None:
        """Hand ``message`` to every worker (``("bind", ...)``, ``("execute", ...)``)."""
        self.check()
        try:
            for rank in range(1, self.world):
                _send_obj(self.comm, message, rank)
        except Exception as exc:
            self.fail(f"sending a step to the workers failed ({type(exc).__name__}: {exc})")
            raise TensorParallelError(f"{self.broken}; restart the engine") from exc

    def fail(self, why: str) -> None:
        if self.broken is None:
            self.broken = why

    def close(self) -> None:
        """Stop the workers and leave the group."""
        if self.comm is not None and self.broken is None:
            try:
                for rank in range(1, self.world):
                    _send_obj(self.comm, ("stop",), rank)
            except Exception:  # a worker gone already: it is stopped below
                logger.debug("stopping the tensor-parallel workers", exc_info=True)
        _stop(self.procs)
        if self.comm is not None:
            self.comm.close()
            self.comm = None
        self._finalizer.detach()


def serve_worker(runtime: Any) -> None:
    """A worker rank's loop: bind a pool, execute steps, until rank 0 says stop."""
    comm = runtime.tp_comm
    pool = None
    while True:
        message = _recv_obj(comm, 0)
        kind = message[0]
        if kind == "execute":
            _, plan, hidden_ids, prompt_logit_ids = message
            runtime.execute_local(plan, hidden_ids=hidden_ids, prompt_logit_ids=prompt_logit_ids)
        elif kind == "bind":
            _, schema, num_blocks = message
            pool = registry.load("kv_pool", "paged", {"num_blocks": num_blocks}, schema=schema)
            runtime.bind_kv_pool(pool)
        elif kind == "stop":
            return
        else:
            raise TensorParallelError(f"unknown message {kind!r} from rank 0")


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry of a spawned worker: the config from ``SAGELLM_TP_CONFIG``, rank from argv."""
    import argparse

    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    p = argparse.ArgumentParser(prog="python -m sagellm.engine.runtime.tensor_parallel")
    p.add_argument("--rank", type=int, required=True)
    args = p.parse_args(argv)
    raw = os.environ.get("SAGELLM_TP_CONFIG")
    if not raw:
        raise ConfigError("SAGELLM_TP_CONFIG is not set: workers are started by rank 0")
    config = NativeRuntimeConfig.model_validate(json.loads(raw))
    runtime = NativeRuntime(config.model_copy(update={"tensor_parallel_rank": args.rank}))
    try:
        serve_worker(runtime)
    except Exception as exc:  # rank 0 gone (its socket closed) or a failed step
        logger.warning("tensor-parallel rank %d stops: %s", args.rank, exc)
        return 1
    finally:
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
