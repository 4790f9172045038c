"""Vendor communication backends on torch.distributed (group ``sagellm.comm_backend``).

| name | torch.distributed backend | registered by | devices |
|---|---|---|---|
| ``hccl`` | ``hccl`` | ``torch_npu`` | Ascend ``npu`` |
| ``cncl`` | ``cncl`` | ``torch_mlu`` | Cambricon ``mlu`` |
| ``bkcl`` | ``bkcl`` | ``torch_xmlir`` | Kunlun ``xpu`` |

Hygon's RCCL and MetaX's MCCL sit under torch's ``nccl`` name, so core's own nccl path (or
sagellm-collective-ops) serves them; they have no entry here.

Anchor: ``torch.distributed`` with a vendor backend, as vllm-ascend's and torch_mlu's
users set it up (``init_process_group("hccl")`` after ``import torch_npu``). The vendor
extension is imported only when the backend is built; when torch.distributed does not know
the backend name after that, construction raises
:class:`~sagellm.core.errors.PlatformUnavailableError` naming the package to install.
CPU tensors go over a gloo group made next to the vendor one (vendor collectives take
device tensors only). ``backend=`` overrides the torch.distributed backend name: with
``backend="gloo"`` the same code runs on CPU processes, which is how the tests check it.
"""

from __future__ import annotations

import datetime
import importlib
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from sagellm.core.errors import PlatformUnavailableError

__all__ = [
    "REDUCE_OPS",
    "BkclCommBackend",
    "CnclCommBackend",
    "HcclCommBackend",
    "VendorCommBackend",
    "VendorCommConfig",
    "ensure_backend",
]

#: The reduce ops of core's CommBackend protocol.
REDUCE_OPS = ("sum", "max", "min", "product")


class VendorCommConfig(BaseModel):
    """Options of the vendor communication backends."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(300.0, gt=0)  # process-group timeout
    # bind this process to a device before the group is made (vendor libraries need it):
    # None = rank % device_count, -1 = leave the current device alone
    device_index: int | None = None


def _registered_backends(dist: Any) -> list[str]:
    """Backend names torch.distributed can build here, in its own order."""
    names = [str(n) for n in getattr(dist.Backend, "backend_list", []) if n != "undefined"]
    return [n for n in names if _available(dist, n)]


def _available(dist: Any, name: str) -> bool:
    check = getattr(dist, "is_backend_available", None)
    if check is not None:
        try:
            return bool(check(name))
        except Exception:
            return False
    return name in getattr(dist.Backend, "backend_list", [])


def ensure_backend(name: str, extension: str | None, install_hint: str) -> None:
    """Make sure torch.distributed can build backend ``name``, importing ``extension``.

    Raises PlatformUnavailableError naming the package when it cannot.
    """
    try:
        import torch.distributed as dist
    except ImportError as exc:
        raise PlatformUnavailableError(
            f"comm backend {name!r} needs torch (pip install torch), which is not installed"
        ) from exc
    if not dist.is_available():
        raise PlatformUnavailableError(
            f"comm backend {name!r} needs torch.distributed, which this torch build lacks"
        )
    if _available(dist, name):
        return
    why = ""
    if extension is not None:
        try:
            importlib.import_module(extension)
        except ImportError:
            why = f"{extension} is not installed"
        except Exception as exc:  # its native libraries fail to load
            why = f"{extension} failed to import ({type(exc).__name__}: {exc})"
        else:
            if _available(dist, name):
                return
            why = f"{extension} imported but did not register it"
    registered = ", ".join(_registered_backends(dist)) or "none"
    raise PlatformUnavailableError(
        f"torch.distributed backend {name!r} is not available (registered here: "
        f"{registered}); {why + '; ' if why else ''}{install_hint}"
    )


class VendorCommBackend:
    """core's ``CommBackend`` over a torch.distributed vendor backend.

    Context: ``rank=``, ``world_size=`` and ``init_method=`` (``tcp://host:port``,
    ``file:///path``; default ``env://``), or ``group=`` an existing process group.
    ``backend=`` replaces the torch.distributed backend name (``"gloo"`` on CPU).
    """

    config_class: ClassVar[type[VendorCommConfig]] = VendorCommConfig
    backend_name: ClassVar[str] = "gloo"  # the torch.distributed backend
    extension: ClassVar[str | None] = None  # what registers it ("torch_npu")
    device_type: ClassVar[str] = "cpu"  # torch device type of its tensors
    install_hint: ClassVar[str] = "pip install torch"

    def __init__(
        self,
        config: VendorCommConfig | None = None,
        *,
        rank: int,
        world_size: int,
        init_method: str | None = None,
        group: Any = None,
        backend: str | None = None,
    ) -> None:
        self.config = config or VendorCommConfig()
        if isinstance(world_size, bool) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank {rank} with world_size {world_size}: need world_size >= 1 and "
                "0 <= rank < world_size"
            )
        self._rank = rank
        self._world_size = world_size
        self.torch_backend = backend or self.backend_name
        vendor = self.torch_backend == self.backend_name
        ensure_backend(
            self.torch_backend,
            self.extension if vendor else None,
            self.install_hint if vendor else "pip install torch",
        )
        import torch.distributed as dist

        self._dist = dist
        if self.torch_backend != "gloo" and self.device_type != "cpu":
            self._bind_device()
        timeout = datetime.timedelta(seconds=self.config.timeout_s)
        self._owns_default = False
        if group is not None:
            self._group = group
        elif dist.is_initialized():
            self._group = dist.group.WORLD
        else:
            dist.init_process_group(
                self.torch_backend,
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
        self._cpu_group = (
            self._group
            if self.torch_backend == "gloo"
            else dist.new_group(backend="gloo", timeout=timeout)
        )
        self._closed = False

    def _bind_device(self) -> None:
        index = self.config.device_index
        if index == -1:
            return
        import torch

        module = getattr(torch, self.device_type, None)
        if module is None or not hasattr(module, "set_device"):
            return
        if index is None:
            count = int(module.device_count())
            if count < 1:
                return
            index = self._rank % count
        module.set_device(index)

    # ------------------------------------------------------------------ protocol
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this communication backend is closed: build a new one")

    def _group_for(self, tensor: Any) -> Any:
        return self._cpu_group if tensor.device.type == "cpu" else self._group

    def all_reduce(self, tensor: Any, op: str = "sum") -> None:
        """Reduce ``tensor`` in place across ranks; ``op`` is sum, max, min or product."""
        self._check_open()
        if op not in REDUCE_OPS:
            raise ValueError(f"unknown reduce op {op!r}: use one of {', '.join(REDUCE_OPS)}")
        if self._world_size == 1:
            return
        dist = self._dist
        reduce_op = {
            "sum": dist.ReduceOp.SUM,
            "max": dist.ReduceOp.MAX,
            "min": dist.ReduceOp.MIN,
            "product": dist.ReduceOp.PRODUCT,
        }[op]
        work = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.all_reduce(work, op=reduce_op, group=self._group_for(tensor))
        if work is not tensor:
            tensor.copy_(work)

    def all_gather(self, output: Any, tensor: Any) -> None:
        """``output`` gets every rank's ``tensor``, concatenated along dim 0 in rank order."""
        self._check_open()
        n = tensor.numel()
        if output.numel() != self._world_size * n or output.dtype != tensor.dtype:
            raise ValueError(
                f"all_gather output must hold world_size x {n} = {self._world_size * n} "
                f"elements of {tensor.dtype} (shape ({self._world_size * n},) or any shape of "
                f"that size), got shape {tuple(output.shape)} with {output.numel()} elements "
                f"of {output.dtype}"
            )
        import torch

        flat_out = output if output.is_contiguous() else torch.empty_like(output)
        # all_gather_single is the newer name of all_gather_into_tensor (torch >= 2.13)
        gather = getattr(self._dist, "all_gather_single", None) or self._dist.all_gather_into_tensor
        gather(flat_out.view(-1), tensor.reshape(-1).contiguous(), group=self._group_for(tensor))
        if flat_out is not output:
            output.copy_(flat_out)

    def send(self, tensor: Any, dst: int) -> None:
        """Send ``tensor`` to rank ``dst``."""
        self._check_open()
        group = self._group_for(tensor)
        self._dist.send(tensor, dst=self._dist.get_global_rank(group, dst), group=group)

    def recv(self, tensor: Any, src: int) -> None:
        """Receive into ``tensor`` what rank ``src`` sends."""
        self._check_open()
        group = self._group_for(tensor)
        self._dist.recv(tensor, src=self._dist.get_global_rank(group, src), group=group)

    def barrier(self) -> None:
        """Return once every rank has entered the barrier."""
        self._check_open()
        self._dist.barrier(group=self._cpu_group)

    def close(self) -> None:
        """Destroy the process group if this backend made it; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_default and self._dist.is_initialized():
            self._dist.destroy_process_group()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.torch_backend!r}, rank={self._rank}, "
            f"world_size={self._world_size})"
        )


class HcclCommBackend(VendorCommBackend):
    """Huawei HCCL (Ascend NPUs), registered in torch.distributed by ``torch_npu``."""

    backend_name = "hccl"
    extension = "torch_npu"
    device_type = "npu"
    install_hint = "pip install torch_npu (Huawei Ascend CANN)"


class CnclCommBackend(VendorCommBackend):
    """Cambricon CNCL (MLUs), registered in torch.distributed by ``torch_mlu``."""

    backend_name = "cncl"
    extension = "torch_mlu"
    device_type = "mlu"
    install_hint = "pip install torch_mlu (Cambricon Neuware SDK)"


class BkclCommBackend(VendorCommBackend):
    """Kunlunxin BKCL (XPUs), registered in torch.distributed by ``torch_xmlir``."""

    backend_name = "bkcl"
    extension = "torch_xmlir"
    device_type = "xpu"
    install_hint = "pip install torch_xmlir (Kunlunxin XPU SDK)"
