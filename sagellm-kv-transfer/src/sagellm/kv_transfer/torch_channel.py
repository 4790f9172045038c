"""The ``torch`` channel: KV blocks over gloo point-to-point between two instances.

Anchor: vLLM's P2pNcclConnector (a two-rank communicator per instance pair, the
producer sending tensors the consumer asked for) and SGLang's chunked P->D push.
Differences: a standalone ``ProcessGroupGloo`` on the pair's ``PrefixStore(TCPStore)``
(no default process group, so an engine's own groups are untouched and any CPU box
works); the consumer pulls through the control plane of :mod:`sagellm.kv_transfer.channel`;
messages are ``chunk_blocks`` blocks of one layer, layer by layer, double-buffered: the
producer packs message ``i + 1`` while ``i`` is on the wire and the consumer posts the
receive of ``i + 1`` before writing ``i`` into its pool. Uncompressed, a message is two
sends (keys, then values), and a side whose blocks of a message are consecutive ids sends
from (or receives into) the pool's own storage with no staging copy. Optional int8
compression (:mod:`sagellm.kv_transfer.compress`) sends a quarter of float32's bytes.
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from sagellm.core.protocols import KVPool
from sagellm.kv_transfer.channel import BaseKVChannel, _Load
from sagellm.kv_transfer.compress import dequantize, quantize_into
from sagellm.kv_transfer.config import TorchChannelConfig
from sagellm.kv_transfer.errors import KVTransferError
from sagellm.kv_transfer.plan import Message, id_runs, message_bytes, messages

__all__ = ["TorchKVChannel"]

_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _gather(src: torch.Tensor, ids: tuple[int, ...], out: torch.Tensor) -> None:
    runs = id_runs(ids)
    if len(runs) == 1:
        out.copy_(src[ids[0] : ids[0] + len(ids)])
    else:
        torch.index_select(src, 0, torch.tensor(ids), out=out)


def _scatter(dst: torch.Tensor, ids: tuple[int, ...], values: torch.Tensor) -> None:
    runs = id_runs(ids)
    if len(runs) == 1:
        dst[ids[0] : ids[0] + len(ids)].copy_(values)
    else:
        dst.index_copy_(0, torch.tensor(ids), values)


def _direct(cache: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor | None:
    """The pool's own storage of ``ids`` when they are consecutive (one contiguous slice of
    a contiguous cache), else None (the message goes through a staging buffer)."""
    if len(id_runs(ids)) != 1 or not cache.is_contiguous():
        return None
    return cache[ids[0] : ids[0] + len(ids)]


class TorchKVChannel(BaseKVChannel):
    """KV transfer over a standalone gloo process group (entry point ``torch``).

    Build one per side: ``TorchKVChannel(TorchChannelConfig(role="producer",
    address="0.0.0.0:0"), pool=pool)`` returns at once (its ``address`` names the port
    it got); the consumer's ``TorchChannelConfig(role="consumer", address=...)`` returns
    once the pair is connected. The consumer's ``chunk_blocks`` and ``compression``
    decide a load's format; each side's ``pipeline`` decides its own overlap.
    """

    config_class: ClassVar[type[BaseModel]] = TorchChannelConfig
    config: TorchChannelConfig

    def __init__(self, config: TorchChannelConfig, *, pool: KVPool | None = None) -> None:
        if config.compression == "int8" and pool is not None:
            self._check_compressible(pool)
        super().__init__(config, pool=pool)
        self._pg: Any = None
        if config.role == "consumer":
            self._pg = self._make_group(rank=1)
        self._start()

    @staticmethod
    def _check_compressible(pool: KVPool) -> None:
        schema = pool.schema
        if schema.dtype not in _FLOAT_DTYPES or schema.is_quantized:
            raise ValueError(
                f"int8 compression needs a float32/bfloat16/float16 cache, this pool stores "
                f"{schema.dtype}{' with scales' if schema.is_quantized else ''}; "
                "use compression='none'"
            )

    def _make_group(self, rank: int) -> Any:
        from torch.distributed import PrefixStore, ProcessGroupGloo

        try:
            return ProcessGroupGloo(PrefixStore("pg/", self._store), rank, 2, self._timeout)
        except Exception as exc:
            raise KVTransferError(
                f"the gloo group of the pair at {self.address} did not form within "
                f"{self.config.timeout_s:g} s ({exc}); is the other side running?"
            ) from exc

    def _connect_producer(self) -> None:
        self._pg = self._make_group(rank=0)

    def _load_details(self, load: _Load) -> dict[str, Any]:
        if self.config.compression == "int8":
            self._check_compressible(self._need_pool())
        return {"chunk_blocks": self.config.chunk_blocks, "compression": self.config.compression}

    def _check_load(self, msg: dict[str, Any]) -> str | None:
        if msg["compression"] == "int8":
            try:
                self._check_compressible(self._need_pool())
            except ValueError as exc:
                return str(exc)
        return None

    # --------------------------------------------------------------- wire format

    def _views(
        self, buf: torch.Tensor, n: int, compression: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[2, n, block, heads, size]`` payload view and, for int8, ``[2, n, heads]`` scales."""
        s = self._need_pool().schema
        if compression == "none":
            dtype = getattr(torch, s.dtype)
            return buf.view(dtype).view(2, n, s.block_size, s.num_kv_heads, s.head_size), None
        # scales first: offset 0 keeps the float32 view aligned
        nscale = 2 * n * s.num_kv_heads * 4
        scales = buf[:nscale].view(torch.float32).view(2, n, s.num_kv_heads)
        q = buf[nscale:].view(torch.int8).view(2, n, s.block_size, s.num_kv_heads, s.head_dim)
        return q, scales

    def _pack(self, m: Message, buf: torch.Tensor, compression: str) -> None:
        pool = self._need_pool()
        kv = pool.layer_cache(m.layer)
        payload, scales = self._views(buf, len(m.src_ids), compression)
        for j in range(2):
            if scales is None:
                _gather(kv[j], m.src_ids, payload[j])
            else:
                tmp = torch.empty_like(payload[j], dtype=kv[j].dtype)
                _gather(kv[j], m.src_ids, tmp)
                quantize_into(tmp, payload[j], scales[j])

    def _unpack(self, m: Message, buf: torch.Tensor, compression: str) -> None:
        kv = self._need_pool().layer_cache(m.layer)
        payload, scales = self._views(buf, len(m.dst_ids), compression)
        for j in range(2):
            values = (
                payload[j] if scales is None else dequantize(payload[j], scales[j], kv[j].dtype)
            )
            _scatter(kv[j], m.dst_ids, values)

    # --------------------------------------------------------------- data path

    def _buffers(self, chunk: int, compression: str, count: int) -> list[torch.Tensor]:
        nbytes = message_bytes(self._need_pool().schema, chunk, compression)
        return [torch.empty(nbytes, dtype=torch.uint8) for _ in range(count)]

    def _sources(self, m: Message, buf: torch.Tensor, compression: str) -> list[torch.Tensor]:
        """What message ``m`` sends: the int8 buffer packed whole, or the keys and the
        values (each the pool's own slice when ``m``'s ids are consecutive)."""
        if compression != "none":
            self._pack(m, buf, compression)
            return [buf]
        kv = self._need_pool().layer_cache(m.layer)
        payload, _ = self._views(buf, len(m.src_ids), compression)
        out = []
        for j in range(2):
            direct = _direct(kv[j], m.src_ids)
            if direct is None:
                _gather(kv[j], m.src_ids, payload[j])
                direct = payload[j]
            out.append(direct)
        return out

    def _serve(self, seq: int, msg: dict[str, Any], src_ids: list[int]) -> int:
        schema = self._need_pool().schema
        chunk, compression = int(msg["chunk_blocks"]), str(msg["compression"])
        plan_msgs = messages(schema.num_layers, src_ids, src_ids, chunk)
        depth = 2 if self.config.pipeline else 1
        bufs = self._buffers(min(chunk, len(src_ids)), compression, depth)
        works: list[list[Any]] = [[] for _ in range(depth)]
        total = 0
        for m in plan_msgs:
            slot = m.index % depth
            for w in works[slot]:
                w.wait()  # the buffer is free again once its sends are done
            n = message_bytes(schema, len(m.src_ids), compression)
            parts = self._sources(m, bufs[slot][:n], compression)
            works[slot] = [self._pg.send([t], 1, 2 * m.index + j) for j, t in enumerate(parts)]
            if depth == 1:
                for w in works[slot]:
                    w.wait()
                works[slot] = []
            total += n
        for ws in works:
            for w in ws:
                w.wait()
        return total

    def _receive(self, seq: int, load: _Load, reply: dict[str, Any]) -> int:
        schema = self._need_pool().schema
        plan = load.plan
        chunk, compression = self.config.chunk_blocks, self.config.compression
        plan_msgs = messages(schema.num_layers, plan.block_ids, plan.dst_block_ids, chunk)
        depth = 2 if self.config.pipeline else 1
        bufs = self._buffers(min(chunk, len(plan.block_ids)), compression, depth)
        timeout = timedelta(seconds=self.config.timeout_s)
        # per posted message: its receive works and, for each K/V part, whether it landed
        # in a staging view (to scatter) or straight in the pool (None)
        pending: deque[tuple[list[Any], torch.Tensor, list[torch.Tensor | None]]] = deque()

        def post(m: Message) -> None:
            n = message_bytes(schema, len(m.src_ids), compression)
            view = bufs[m.index % depth][:n]
            if compression != "none":
                pending.append(([self._pg.recv([view], 0, 2 * m.index)], view, []))
                return
            kv = self._need_pool().layer_cache(m.layer)
            payload, _ = self._views(view, len(m.dst_ids), compression)
            works, staged = [], []
            for j in range(2):
                direct = _direct(kv[j], m.dst_ids)
                target = payload[j] if direct is None else direct
                works.append(self._pg.recv([target], 0, 2 * m.index + j))
                staged.append(payload[j] if direct is None else None)
            pending.append((works, view, staged))

        for m in plan_msgs[:depth]:
            post(m)
        total = 0
        for i, m in enumerate(plan_msgs):
            works, view, staged = pending.popleft()
            for w in works:
                w.wait(timeout)
            if compression != "none":
                self._unpack(m, view, compression)
            else:
                kv = self._need_pool().layer_cache(m.layer)
                for j, part in enumerate(staged):
                    if part is not None:
                        _scatter(kv[j], m.dst_ids, part)
            total += view.numel()
            if m.last_of_layer:
                load.layer_done(m.layer)
            if i + depth < len(plan_msgs):
                post(plan_msgs[i + depth])
        return total

    def _close_transport(self) -> None:
        self._pg = None
