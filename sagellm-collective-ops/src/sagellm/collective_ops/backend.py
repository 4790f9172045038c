"""The ``torch`` communication backend (entry point ``sagellm.comm_backend: torch``).

torch.distributed underneath: gloo on CPU, nccl on CUDA, or any backend name a platform
registers with ``torch.distributed.Backend.register_backend`` (hccl, cncl, ...). For CPU
tensors of ranks that share one host, all-reduce and all-gather go through a shared
segment (:mod:`sagellm.collective_ops.shm`) when the cost table says so; everything
else (device tensors, other hosts, send/recv) is the process group's.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
from collections import Counter
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from sagellm.collective_ops.config import CollectiveConfig
from sagellm.collective_ops.shm import (
    ALGORITHMS,
    REDUCE_OPS,
    ShmGroup,
    process_alive,
    shm_supported,
)
from sagellm.collective_ops.tuner import CostModel, Tuner, choose

__all__ = ["CommStats", "TorchCommBackend", "resolve_backend"]

_TORCH_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}
_VALID_ALGORITHMS = (*ALGORITHMS, "torch")


def resolve_backend(name: str) -> str:
    """``auto`` -> the current platform's backend (gloo on CPU, nccl on CUDA); else ``name``."""
    if name != "auto":
        return name
    from sagellm.core.platforms import current_platform

    return current_platform().dist_backend


def _host_identity() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class CommStats:
    """Collectives issued since the last :meth:`TorchCommBackend.make_stats`, per algorithm."""

    def __init__(self, calls: dict[str, int], bytes_: dict[str, int]) -> None:
        self.calls = calls  # "all_reduce/shm_flat" -> count
        self.bytes = bytes_  # same keys -> bytes reduced or gathered

    def __repr__(self) -> str:
        return f"CommStats(calls={self.calls}, bytes={self.bytes})"


class TorchCommBackend:
    """core's ``CommBackend`` over torch.distributed, with same-host shared memory.

    Context: ``rank=``, ``world_size=`` and ``init_method=`` (``tcp://host:port``,
    ``file:///path``; default ``env://``), or ``group=`` an existing process group.
    ``tuner=`` edits each call's cost table (NCCL tuner-plugin style).
    """

    config_class: ClassVar[type[CollectiveConfig]] = CollectiveConfig

    def __init__(
        self,
        config: CollectiveConfig | None = None,
        *,
        rank: int,
        world_size: int,
        init_method: str | None = None,
        group: Any = None,
        tuner: Tuner | None = None,
        cost_model: CostModel | None = None,
    ) -> None:
        self.config = config or CollectiveConfig()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank {rank} with world_size {world_size}: need world_size >= 1 and "
                "0 <= rank < world_size"
            )
        if self.config.algorithm is not None and self.config.algorithm not in _VALID_ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {self.config.algorithm!r}: use one of "
                f"{', '.join(_VALID_ALGORITHMS)} or None"
            )
        self._rank = rank
        self._world_size = world_size
        # the choice per (collective, bytes, device) is cached: the table is rebuilt only
        # when the tuner or the cost model changes
        self._choices: dict[tuple[str, int, str], tuple[str, str]] = {}
        self._tuner = tuner
        self._cost_model = cost_model or CostModel()
        self.backend_name = resolve_backend(self.config.backend)
        self._owns_default = False
        timeout = datetime.timedelta(seconds=self.config.timeout_s)
        if group is not None:
            self._group = group
        elif dist.is_initialized():
            self._group = dist.group.WORLD
        else:
            dist.init_process_group(
                self.backend_name,
                init_method=init_method or "env://",
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )
            self._owns_default = True
            self._group = dist.group.WORLD
        if dist.get_world_size(self._group) != world_size or dist.get_rank(self._group) != rank:
            raise ValueError(
                f"the process group has rank {dist.get_rank(self._group)} of "
                f"{dist.get_world_size(self._group)}, not rank {rank} of {world_size}"
            )
        # object exchange and the shared-memory set-up go over a CPU group
        self._cpu_group = (
            self._group
            if self.backend_name == "gloo"
            else dist.new_group(backend="gloo", timeout=timeout)
        )
        self._shm: ShmGroup | None = None
        if self.config.shm and world_size > 1 and shm_supported():
            self._shm = self._attach_shm()
        self._calls: Counter[str] = Counter()
        self._bytes: Counter[str] = Counter()
        self._closed = False

    # ------------------------------------------------------------------ set-up
    def _gather_bytes(self, data: bytes, length: int = 64) -> list[bytes]:
        """Every rank's ``data`` (at most ``length`` bytes), over the CPU group.

        Tensors, not ``all_gather_object``: torch's object collectives need numpy.
        """
        if len(data) > length:
            raise ValueError(f"{len(data)} bytes do not fit the {length}-byte exchange")
        mine = torch.zeros(length + 1, dtype=torch.uint8)
        mine[0] = len(data)
        if data:
            mine[1 : 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        every = [torch.empty_like(mine) for _ in range(self._world_size)]
        dist.all_gather(every, mine, group=self._cpu_group)
        return [bytes(t[1 : 1 + int(t[0])].tolist()) for t in every]

    def _attach_shm(self) -> ShmGroup | None:
        """Collective: one segment for the group when every rank is on this host."""
        hosts = self._gather_bytes(hashlib.sha256(_host_identity().encode()).digest())
        if len(set(hosts)) != 1:
            return None
        slot = self.config.shm_slot_bytes // 64 * 64
        created = ShmGroup.create_segment(self._world_size, slot) if self._rank == 0 else None
        segment = created
        try:
            names = self._gather_bytes(created.name.encode() if created is not None else b"")
            ok = True
            if segment is None:
                try:
                    segment = ShmGroup.open_segment(names[0].decode())
                except (OSError, ValueError):
                    ok = False
            oks = self._gather_bytes(b"1" if ok else b"0")  # every rank has mapped it
        except BaseException:
            if segment is not None:
                segment.close()  # the creator's close also unlinks: no stale segment
            raise
        if created is not None:
            created.unlink()  # lives while mapped; nothing left in /dev/shm after
        if oks != [b"1"] * self._world_size:
            if segment is not None:
                segment.close()
            return None
        assert segment is not None
        pids = [int(p) for p in self._gather_bytes(str(os.getpid()).encode())]
        # a wait notices a peer that exited only where every rank sees the others' pids
        # (one pid namespace)
        seen = self._gather_bytes(b"1" if all(process_alive(p) for p in pids) else b"0")
        watch = pids if seen == [b"1"] * self._world_size else None
        return ShmGroup(
            segment, self._rank, self._world_size, slot, self.config.timeout_s, peer_pids=watch
        )

    @property
    def tuner(self) -> Tuner | None:
        """The tuner that edits each cost table (None: the model's table as is)."""
        return self._tuner

    @tuner.setter
    def tuner(self, tuner: Tuner | None) -> None:
        self._tuner = tuner
        self._choices.clear()

    @property
    def cost_model(self) -> CostModel:
        """Constants of the cost table (priors, or rank 0's calibration)."""
        return self._cost_model

    @cost_model.setter
    def cost_model(self, model: CostModel) -> None:
        self._cost_model = model
        self._choices.clear()

    # ------------------------------------------------------------------ protocol
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def has_shm(self) -> bool:
        """Whether same-host shared-memory collectives are set up."""
        return self._shm is not None

    def algorithms(self, coll: str, tensor: torch.Tensor) -> list[str]:
        """The algorithms that can run ``coll`` on ``tensor``."""
        if self._shm is not None and tensor.device.type == "cpu":
            return (
                ["shm_flat", "shm_direct", "torch"]
                if coll == "all_reduce"
                else ["shm_flat", "torch"]
            )
        return ["torch"]

    def cost_table(self, coll: str, tensor: torch.Tensor) -> dict[str, float]:
        """Modelled microseconds per algorithm, after the tuner's edits."""
        nbytes = tensor.numel() * tensor.element_size()
        table = self.cost_model.table(coll, nbytes, self._world_size, self.algorithms(coll, tensor))
        if self.tuner is not None:
            self.tuner.get_coll_info(coll, nbytes, self._world_size, 1, table)
        return table

    def choose(self, coll: str, tensor: torch.Tensor) -> str:
        """The algorithm a call of ``coll`` on ``tensor`` runs."""
        return self._choice(coll, tensor)[0]

    def _choice(self, coll: str, tensor: torch.Tensor) -> tuple[str, str]:
        key = (coll, tensor.numel() * tensor.element_size(), tensor.device.type)
        found = self._choices.get(key)
        if found is None:
            algorithm = self._choose(coll, tensor)
            found = (algorithm, f"{coll}/{algorithm}")
            self._choices[key] = found
        return found

    def _choose(self, coll: str, tensor: torch.Tensor) -> str:
        forced = self.config.algorithm
        if forced is not None:
            possible = self.algorithms(coll, tensor)
            if forced in possible:
                return forced
            if forced == "shm_direct" and "shm_flat" in possible:
                return "shm_flat"  # all_gather has one shared-memory algorithm
            return "torch"
        return choose(self.cost_table(coll, tensor))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this communication backend is closed: build a new one")

    def _count(self, key: str, tensor: torch.Tensor) -> None:
        self._calls[key] += 1
        self._bytes[key] += tensor.numel() * tensor.element_size()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce in place; ``op`` is sum, max, min or product."""
        self._check_open()
        if op not in REDUCE_OPS:
            raise ValueError(f"unknown reduce op {op!r}: use one of {', '.join(REDUCE_OPS)}")
        if self._world_size == 1:
            return
        algorithm, key = self._choice("all_reduce", tensor)
        self._count(key, tensor)
        if algorithm == "torch":
            dist.all_reduce(tensor, op=_TORCH_OPS[op], group=self._group_for(tensor))
            return
        assert self._shm is not None
        if tensor.dim() == 1 and tensor.is_contiguous():
            flat = tensor
        else:
            flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        self._shm.all_reduce(flat, op, algorithm)
        if not tensor.is_contiguous():
            tensor.copy_(flat.view(tensor.shape))

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor) -> None:
        """``output`` gets every rank's ``tensor``, concatenated along dim 0 in rank order."""
        self._check_open()
        n = tensor.numel()
        if output.numel() != self._world_size * n or output.dtype != tensor.dtype:
            raise ValueError(
                f"all_gather output must hold world_size x {n} = {self._world_size * n} "
                f"elements of {tensor.dtype}, got {output.numel()} of {output.dtype}"
            )
        algorithm, key = self._choice("all_gather", tensor)
        self._count(key, tensor)
        contiguous = output if output.is_contiguous() else torch.empty_like(output)
        flat_in = tensor.reshape(-1)
        if algorithm == "torch":
            dist.all_gather_single(
                contiguous.view(-1), flat_in.contiguous(), group=self._group_for(tensor)
            )
        else:
            assert self._shm is not None
            self._shm.all_gather(contiguous.view(-1), flat_in.contiguous())
        if contiguous is not output:
            output.copy_(contiguous)

    def _group_for(self, tensor: torch.Tensor) -> Any:
        """The device group, or the gloo group for CPU tensors under a device backend."""
        return self._cpu_group if tensor.device.type == "cpu" else self._group

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._check_open()
        group = self._group_for(tensor)
        dist.send(tensor, dst=dist.get_global_rank(group, dst), group=group)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self._check_open()
        group = self._group_for(tensor)
        dist.recv(tensor, src=dist.get_global_rank(group, src), group=group)

    def barrier(self) -> None:
        self._check_open()
        if self._shm is not None:
            self._shm.barrier()
        else:
            dist.barrier(group=self._group)

    def exchange(self, out: torch.Tensor, tensor: torch.Tensor) -> None:
        """Shared-memory ring exchange (send to rank+1, receive from rank-1): the copy
        ceiling the benchmark measures; needs the shared segment."""
        self._check_open()
        if self._shm is None:
            raise RuntimeError("exchange needs shared memory (ranks on one x86-64 host, shm=True)")
        self._shm.exchange(out.view(-1), tensor.reshape(-1).contiguous())

    def calibrate(self, small: int = 64, large: int = 4 << 20, repeats: int = 20) -> CostModel:
        """Collective: measure the cost model's constants on rank 0, share them with all.

        ``step_us`` from a shared-memory exchange of ``small`` bytes, ``mem_gbps`` from
        one of ``large`` bytes (4 x its size of traffic), the CPU (gloo) group's alpha and
        beta from its all-reduce of both sizes; best of ``repeats`` each.
        """
        import time

        def best(fn: Any) -> float:
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times) * 1e6

        values: dict[str, float] = {}
        a_small = torch.zeros(small // 4)
        a_large = torch.zeros(large // 4)
        t_small = best(lambda: dist.all_reduce(a_small, group=self._cpu_group))
        t_large = best(lambda: dist.all_reduce(a_large, group=self._cpu_group))
        beta = max(large - small, 1) / max(t_large - t_small, 1e-3) / 1e3
        values["torch_beta_gbps"] = beta
        values["torch_alpha_us"] = max(t_small - small / (beta * 1e3), 0.0)
        if self._shm is not None:
            out_s, out_l = torch.empty_like(a_small), torch.empty_like(a_large)
            step = best(lambda: self._shm.exchange(out_s, a_small))  # type: ignore[union-attr]
            big = best(lambda: self._shm.exchange(out_l, a_large))  # type: ignore[union-attr]
            values["step_us"] = step
            values["mem_gbps"] = 4 * large / max(big - step, 1e-3) / 1e3
        names = sorted(values)
        packed = torch.tensor([values[k] for k in names], dtype=torch.float64)
        # rank 0's figures for everyone: every rank must build the same cost tables
        dist.broadcast(packed, src=dist.get_global_rank(self._cpu_group, 0), group=self._cpu_group)
        self.cost_model = self.cost_model.with_measurements(
            **{k: float(v) for k, v in zip(names, packed.tolist())}
        )
        return self.cost_model

    def make_stats(self) -> CommStats:
        """Calls and bytes per collective and algorithm since the last call; resets them."""
        stats = CommStats(dict(self._calls), dict(self._bytes))
        self._calls.clear()
        self._bytes.clear()
        return stats

    def close(self) -> None:
        """Unmap the shared segment and, if this backend made it, destroy the process group."""
        if self._closed:
            return
        self._closed = True
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self._owns_default and dist.is_initialized():
            dist.destroy_process_group()
