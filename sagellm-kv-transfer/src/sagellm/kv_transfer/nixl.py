"""The ``nixl`` channel: the consumer reads blocks with a NIXL agent (UCX by default).

Anchor: vLLM's NixlConnector (decode pulls with a READ transfer, prefill frees on the
notification or when the lease runs out). Differences: the agent metadata and the
producer's region addresses come back in the reply to ``load`` through the pair's store
instead of a ZMQ side channel; one READ per layer so ``wait_for_layer`` returns per layer;
the consumer's ``done`` message (not a NIXL notification) ends the producer's lease.
No compression. Needs ``pip install nixl`` (it brings UCX; the CUDA wheels fall back
to host memory without a GPU).
"""

from __future__ import annotations

import base64
import time
from typing import Any, ClassVar

from pydantic import BaseModel

from sagellm.core.protocols import KVPool
from sagellm.kv_transfer._regions import block_regions, layer_bases
from sagellm.kv_transfer.channel import BaseKVChannel, _Load
from sagellm.kv_transfer.config import NixlChannelConfig
from sagellm.kv_transfer.errors import KVTransferError, TransportUnavailableError

__all__ = ["NixlKVChannel"]


def _nixl() -> Any:
    try:
        from nixl import _api
    except ImportError as exc:
        raise TransportUnavailableError(
            f"the nixl KV channel needs NIXL: pip install nixl ({exc})"
        ) from exc
    return _api


class NixlKVChannel(BaseKVChannel):
    """KV transfer by NIXL READs from the consumer (entry point ``nixl``)."""

    config_class: ClassVar[type[BaseModel]] = NixlChannelConfig
    config: NixlChannelConfig
    _one_sided: ClassVar[bool] = True

    def __init__(self, config: NixlChannelConfig, *, pool: KVPool | None = None) -> None:
        api = _nixl()
        super().__init__(config, pool=pool)
        self._agent = api.nixl_agent(
            self.instance_id, api.nixl_agent_config(backends=list(config.backends))
        )
        self._reg: Any = None
        self._remote: str | None = None
        if pool is not None:
            self.register_pool(pool)
        self._start()

    def register_pool(self, pool: KVPool) -> None:
        """Register every layer's key and value tensor with the agent."""
        super().register_pool(pool)
        if self._reg is None:
            regions = [(addr, n, 0, "") for addr, n, _ in layer_bases(pool)]
            self._reg = self._agent.register_memory(regions, "DRAM")

    def _reply_details(self, msg: dict[str, Any]) -> dict[str, Any]:
        meta = self._agent.get_agent_metadata()
        return {
            "agent": base64.b64encode(meta).decode("ascii"),
            "regions": layer_bases(self._need_pool()),
        }

    def _receive(self, seq: int, load: _Load, reply: dict[str, Any]) -> int:
        if self._remote is None:
            self._remote = self._agent.add_remote_agent(base64.b64decode(reply["agent"]))
        pool = self._need_pool()
        mine = layer_bases(pool)
        theirs = [tuple(r) for r in reply["regions"]]
        plan = load.plan
        total = 0
        for layer in range(pool.schema.num_layers):
            local: list[tuple[int, int, int]] = []
            remote: list[tuple[int, int, int]] = []
            for t in (2 * layer, 2 * layer + 1):
                srcs, dsts, lens = block_regions(
                    theirs, mine, t, plan.block_ids, plan.dst_block_ids
                )  # type: ignore[arg-type]
                remote += [(a, n, 0) for a, n in zip(srcs, lens)]
                local += [(a, n, 0) for a, n in zip(dsts, lens)]
                total += sum(lens)
            handle = self._agent.initialize_xfer(
                "READ",
                self._agent.get_xfer_descs(local, "DRAM"),
                self._agent.get_xfer_descs(remote, "DRAM"),
                self._remote,
                f"{plan.request_id}/{layer}".encode(),
            )
            try:
                state = self._agent.transfer(handle)
                deadline = time.monotonic() + self.config.timeout_s
                while state != "DONE":
                    if state == "ERR":
                        raise KVTransferError(f"NIXL READ of layer {layer} failed")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"NIXL READ of layer {layer} took too long")
                    time.sleep(self.config.poll_interval_s)
                    state = self._agent.check_xfer_state(handle)
            finally:
                self._agent.release_xfer_handle(handle)
            load.layer_done(layer)
        return total

    def _close_transport(self) -> None:
        if self._remote is not None:
            self._agent.remove_remote_agent(self._remote)
            self._remote = None
        if self._reg is not None:
            self._agent.deregister_memory(self._reg)
            self._reg = None
