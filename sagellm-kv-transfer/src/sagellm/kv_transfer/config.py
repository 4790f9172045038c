"""Configuration of the KV transfer channels, one frozen model per channel."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ChannelConfig",
    "MooncakeChannelConfig",
    "NixlChannelConfig",
    "TorchChannelConfig",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ChannelConfig(BaseModel):
    """What every channel needs: its role, where the pair meets, leases and timeouts."""

    model_config = _FROZEN

    # producer (prefill: keeps and serves blocks) or consumer (decode: loads them)
    role: Literal["producer", "consumer"]
    # "host:port" of the pair's TCPStore, which the producer hosts; the producer may
    # give port 0 (any free port) and publish the address it got (channel.address)
    address: str = "127.0.0.1:0"
    instance_id: str = ""  # name in plans and messages ("" : the role and the address)
    # seconds a producer keeps offered blocks nobody acknowledges (vLLM NIXL: 30 s)
    lease_s: float = Field(30.0, gt=0.0)
    # seconds any one wait (connect, a message, a load) may take before it fails
    timeout_s: float = Field(60.0, gt=0.0)

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(
                f"address {value!r} is not 'host:port' with a port in 0..65535 "
                "(e.g. '127.0.0.1:29600'; port 0 lets the producer pick one)"
            )
        return value

    @property
    def host(self) -> str:
        """Host part of :attr:`address`."""
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        """Port part of :attr:`address`."""
        return int(self.address.rpartition(":")[2])


class TorchChannelConfig(ChannelConfig):
    """The ``torch`` channel: gloo point-to-point on a standalone process group."""

    chunk_blocks: int = Field(8, ge=1)  # blocks of one layer per message
    # overlap: pack message i+1 while i is on the wire; post the receive of i+1 before
    # writing i into the pool
    pipeline: bool = True
    # "int8": per block and head absmax int8 with a float32 scale beside (floating caches
    # only); |error| <= absmax / 254 of that block and head, before rounding to the dtype
    compression: Literal["none", "int8"] = "none"


class MooncakeChannelConfig(ChannelConfig):
    """The ``mooncake`` channel: Mooncake Transfer Engine writes (producer pushes)."""

    protocol: Literal["tcp", "rdma"] = "tcp"  # Mooncake transport
    device_name: str = ""  # RDMA devices ("" : auto discovery; unused for tcp)
    local_hostname: str = "127.0.0.1"  # this host as the peer reaches it


class NixlChannelConfig(ChannelConfig):
    """The ``nixl`` channel: NIXL agent reads (consumer pulls)."""

    backends: tuple[str, ...] = ("UCX",)  # NIXL backend plugins to create
    poll_interval_s: float = Field(0.0005, gt=0.0)  # between check_xfer_state calls
