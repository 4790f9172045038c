"""Configuration of sagellm.collective_ops."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CollectiveConfig(BaseModel):
    """Options of the torch.distributed backend with shared-memory collectives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # torch.distributed backend: "auto" = the platform's (gloo on CPU, nccl on CUDA), or
    # any name torch knows, including those a platform registers (hccl, cncl, ...)
    backend: str = "auto"
    # shared-memory all-reduce/all-gather for CPU tensors when every rank is on this host
    shm: bool = True
    # bytes of one rank's shared-memory slot; larger messages go in slot-sized rounds
    shm_slot_bytes: int = Field(4 << 20, ge=4096)
    # force one all-reduce algorithm (shm_flat, shm_direct, torch) as NCCL_ALGO does;
    # None: the cheapest in the cost table
    algorithm: str | None = None
    # seconds a collective waits for its peers before raising TimeoutError
    timeout_s: float = Field(300.0, gt=0)
    # DDP's bucket size: small tensors handed to all_reduce_coalesced are fused up to it
    bucket_cap_mb: float = Field(25.0, gt=0)
