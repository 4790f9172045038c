"""PagedKVPool: fixed-size KV blocks in one storage tensor on one device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import BaseModel

from sagellm.core.errors import ConfigError
from sagellm.core.types import KVCacheSchema
from sagellm.kv_pool.allocator import BlockAllocator
from sagellm.kv_pool.capacity import parse_device, resolve_num_blocks
from sagellm.kv_pool.config import PagedKVPoolConfig
from sagellm.kv_pool.transfer import copy_blocks_between, id_runs, use_slices

__all__ = ["PagedKVPool", "torch_dtype"]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named by a :data:`sagellm.core.types.DType` string."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"KV dtype {name!r} is not a torch dtype")
    return dtype


class PagedKVPool(BlockAllocator):
    """A paged pool of KV-cache blocks (implements ``sagellm.core.protocols.KVPool``).

    Storage is one tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads,
    head_size]`` in ``schema.dtype`` on ``device``; :meth:`layer_cache` returns views of it.
    ``head_size`` is ``head_dim``, plus the scale's elements for a quantized schema (an
    int8 or float8 row of ``head_dim`` values ends in its float16 scale), so every copy,
    gather and tier move carries the scales with their values.
    The tensor is created with ``torch.empty``: pages are not touched until written, and a
    newly allocated block holds whatever its previous user left (callers write before they
    read, as attention over a block table does).

    Block ids are handed out from a LIFO free list (see :class:`BlockAllocator`): a new pool
    gives ``0, 1, 2, ...``; freed blocks are reused first, in the order they were freed.

    Usage::

        pool = PagedKVPool(PagedKVPoolConfig(num_blocks=64), schema=schema, device="cpu")
        ids = pool.allocate(4)        # [0, 1, 2, 3]
        k, v = pool.layer_cache(0)    # each [64, block_size, num_kv_heads, head_size]
        pool.free(ids)

    Context: ``schema=`` (KVCacheSchema), ``device=`` (torch device string, default
    "cpu"), ``tier=`` (name in block infos, default "device"), ``pin_memory=`` (page-lock
    a CPU pool for fast transfers to a GPU; default False).
    """

    config_class: ClassVar[type[BaseModel]] = PagedKVPoolConfig

    def __init__(
        self,
        config: PagedKVPoolConfig | None = None,
        *,
        schema: KVCacheSchema,
        device: str | torch.device = "cpu",
        tier: str = "device",
        pin_memory: bool = False,
    ) -> None:
        if config is None:
            config = PagedKVPoolConfig()
        if not isinstance(schema, KVCacheSchema):
            raise ConfigError(
                f"PagedKVPool needs schema= a KVCacheSchema, got {type(schema).__name__}"
            )
        self.config = config
        self._schema = schema
        self._device = parse_device(device)
        num_blocks = resolve_num_blocks(config, schema, self._device)
        super().__init__(num_blocks, tier=tier, block_bytes=schema.bytes_per_block)
        shape = (
            schema.num_layers,
            2,
            num_blocks,
            schema.block_size,
            schema.num_kv_heads,
            schema.head_size,
        )
        pin = bool(pin_memory) and self._device.type == "cpu" and torch.cuda.is_available()
        self._kv = torch.empty(
            shape, dtype=torch_dtype(schema.dtype), device=self._device, pin_memory=pin
        )
        # byte view of the same storage: copies and tier moves work on bytes, so every
        # dtype (float8 included) moves the same way
        self._raw = self._kv.view(torch.uint8)
        self._layers = [(self._kv[i, 0], self._kv[i, 1]) for i in range(schema.num_layers)]

    @property
    def schema(self) -> KVCacheSchema:
        """Layout of every block."""
        return self._schema

    @property
    def device(self) -> torch.device:
        """Device holding the storage."""
        return self._device

    @property
    def storage(self) -> torch.Tensor:
        """The whole storage tensor ``[num_layers, 2, num_blocks, block_size, heads, size]``."""
        return self._kv

    @property
    def raw_storage(self) -> torch.Tensor:
        """The storage as bytes (uint8, last dimension ``head_size * element size``)."""
        return self._raw

    def layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value storage of one layer, each ``[num_blocks, block_size, heads, size]``.

        ``size`` is the schema's ``head_size``: ``head_dim``, then a quantized row's scale.
        """
        if type(layer) is not int or not 0 <= layer < len(self._layers):
            raise ValueError(
                f"layer_cache: layer must be an int in 0..{len(self._layers) - 1}, got {layer!r}"
            )
        return self._layers[layer]

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy the KV content of ``src`` into ``dst`` for every ``(src, dst)`` pair.

        All layers, keys and values move in one indexed copy (or one slice copy per run of
        consecutive ids). Sources are read before destinations are written, so a block may
        be both. Raises ValueError for an unknown id or a destination named twice.
        """
        if not pairs:
            return
        src_ids = self._normalise([p[0] for p in pairs], "copy_blocks")
        dst_ids = self._normalise([p[1] for p in pairs], "copy_blocks")
        seen: set[int] = set()
        for d in dst_ids:
            if d in seen:
                raise ValueError(
                    f"copy_blocks: destination block {d} appears twice; each destination "
                    "takes one source"
                )
            seen.add(d)
        copy_blocks_between(self._raw, self._raw, src_ids, dst_ids)

    def gather_blocks(self, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """Write the bytes of ``block_ids`` block after block into ``out``.

        ``out`` is a uint8 tensor ``[len(block_ids), num_layers, 2, block_size, heads,
        head_size * element size]`` (block-major: each block's bytes are contiguous), on
        any device.
        """
        index = torch.tensor(block_ids, dtype=torch.long, device=self._device)
        block_major = self._raw.permute(2, 0, 1, 3, 4, 5)
        if out.device == self._device:
            torch.index_select(block_major, 0, index, out=out)
        else:
            out.copy_(block_major.index_select(0, index))

    def scatter_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Inverse of :meth:`gather_blocks`: store block-major bytes into ``block_ids``."""
        if data.device != self._device:
            data = data.to(self._device, non_blocking=False)
        runs = id_runs(block_ids)
        if use_slices(len(runs), data.numel()):
            # index_copy_ into the strided block dimension is several times slower than
            # a slice copy per run of consecutive ids
            for pos, first, length in runs:
                self._raw[:, :, first : first + length].copy_(
                    data[pos : pos + length].permute(1, 2, 0, 3, 4, 5)
                )
            return
        index = torch.tensor(block_ids, dtype=torch.long, device=self._device)
        self._raw.permute(2, 0, 1, 3, 4, 5).index_copy_(0, index, data)

    def _move_content(self, src_ids: list[int], dst_ids: list[int]) -> None:
        copy_blocks_between(self._raw, self._raw, src_ids, dst_ids)

    def __repr__(self) -> str:
        return (
            f"PagedKVPool(num_blocks={self.num_blocks}, free={self.num_free_blocks}, "
            f"dtype={self._schema.dtype}, device={self._device}, tier={self._tier!r})"
        )
