"""Configuration of sagellm.topology."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TopologyConfig(BaseModel):
    """Options of the sysfs topology detector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    root: str = "/"  # folder holding sys/ and proc/ ("/" = this machine; a fixture tree in tests)
    use_nvml: bool = True  # ask NVML (pynvml) for NVLinks when it is installed
    use_smi: bool = False  # run `nvidia-smi topo -m` when on PATH (adds ~0.1-1 s)
    nvlink_gbps_per_link: float = Field(20.0, gt=0)  # NCCL's SM80 per-link figure
    calibrate: bool = False  # measure the shared-memory link (two processes, ~0.2 s)
