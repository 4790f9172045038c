"""The ``mooncake`` channel: the producer writes blocks with Mooncake Transfer Engine.

Anchor: vLLM's MooncakeConnector and SGLang's Mooncake backend (the consumer sends its
destination addresses, the producer pushes with ``batch_transfer_sync_write``).
Differences: addresses and completions travel through the pair's store (see
:mod:`sagellm.kv_transfer.channel`); the engines meet with ``P2PHANDSHAKE`` (no etcd);
one batch per layer, each layer announced as it lands, so the consumer's
``wait_for_layer`` returns per layer. No compression (one-sided writes move the pool's
bytes as they are). Needs ``pip install mooncake-transfer-engine-non-cuda`` (CPU) or
``mooncake-transfer-engine`` (CUDA); the wheel's ``engine.so`` also needs
``libibverbs1 libnl-3-200 libnl-route-3-200`` even for TCP.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel

from sagellm.core.protocols import KVPool
from sagellm.kv_transfer._regions import block_regions, layer_bases
from sagellm.kv_transfer.channel import BaseKVChannel, _Load
from sagellm.kv_transfer.config import MooncakeChannelConfig
from sagellm.kv_transfer.errors import KVTransferError, TransportUnavailableError

__all__ = ["MooncakeKVChannel"]

_PIP = "pip install mooncake-transfer-engine-non-cuda  (or mooncake-transfer-engine with CUDA)"


def _engine_class() -> Any:
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise TransportUnavailableError(
            f"the mooncake KV channel needs Mooncake Transfer Engine: {_PIP} ({exc})"
        ) from exc
    return TransferEngine


class MooncakeKVChannel(BaseKVChannel):
    """KV transfer by Mooncake Transfer Engine writes (entry point ``mooncake``)."""

    config_class: ClassVar[type[BaseModel]] = MooncakeChannelConfig
    config: MooncakeChannelConfig

    def __init__(self, config: MooncakeChannelConfig, *, pool: KVPool | None = None) -> None:
        engine_cls = _engine_class()
        super().__init__(config, pool=pool)
        self._engine = engine_cls()
        ret = self._engine.initialize(
            config.local_hostname, "P2PHANDSHAKE", config.protocol, config.device_name
        )
        if ret != 0:
            raise KVTransferError(
                f"Mooncake TransferEngine.initialize({config.local_hostname!r}, "
                f"'P2PHANDSHAKE', {config.protocol!r}) returned {ret}; for tcp set "
                "MC_FORCE_TCP=1, check the apt libraries named in the module docstring"
            )
        self.session_id = f"{config.local_hostname}:{self._engine.get_rpc_port()}"
        self._registered: list[int] = []
        if pool is not None:
            self.register_pool(pool)
        self._start()

    def register_pool(self, pool: KVPool) -> None:
        """Register every layer's key and value tensor with the engine."""
        first = self._pool is None or not self._registered
        super().register_pool(pool)
        if first and not self._registered:
            for addr, nbytes, _ in layer_bases(pool):
                if self._engine.register_memory(addr, nbytes) != 0:
                    raise KVTransferError(f"Mooncake register_memory({addr:#x}, {nbytes}) failed")
                self._registered.append(addr)

    def _load_details(self, load: _Load) -> dict[str, Any]:
        return {"session": self.session_id, "regions": layer_bases(self._need_pool())}

    def _serve(self, seq: int, msg: dict[str, Any], src_ids: list[int]) -> int:
        pool = self._need_pool()
        mine = layer_bases(pool)
        theirs = [tuple(r) for r in msg["regions"]]
        dst_ids = [int(b) for b in msg["dst_block_ids"]]
        total = 0
        for layer in range(pool.schema.num_layers):
            srcs: list[int] = []
            dsts: list[int] = []
            lens: list[int] = []
            for t in (2 * layer, 2 * layer + 1):
                s, d, n = block_regions(mine, theirs, t, src_ids, dst_ids)  # type: ignore[arg-type]
                srcs += s
                dsts += d
                lens += n
            ret = self._engine.batch_transfer_sync_write(msg["session"], srcs, dsts, lens)
            if ret != 0:
                self._ctl.set(f"layer/{seq}/{layer}", json.dumps({"ok": False, "ret": ret}))
                raise KVTransferError(f"Mooncake batch_transfer_sync_write returned {ret}")
            self._ctl.set(f"layer/{seq}/{layer}", json.dumps({"ok": True}))
            total += sum(lens)
        return total

    def _receive(self, seq: int, load: _Load, reply: dict[str, Any]) -> int:
        for layer in range(self._need_pool().schema.num_layers):
            status = self._take(f"layer/{seq}/{layer}", self._timeout)
            if not status["ok"]:
                raise KVTransferError(
                    f"the producer's Mooncake write of layer {layer} failed (ret {status['ret']})"
                )
            load.layer_done(layer)
        return load.plan.total_bytes

    def _close_transport(self) -> None:
        for addr in self._registered:
            self._engine.unregister_memory(addr)
        self._registered.clear()
