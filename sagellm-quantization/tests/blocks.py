"""A small GGUF block encoder for the tests (llama.cpp's layouts, 32 weights a block)."""

from __future__ import annotations

import torch

from sagellm.core.types import PackedWeight


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(*v.shape, 2)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    # weight j of a block in the low nibble of byte j, weight j + 16 in the high nibble
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def q4_1_blocks(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, blocks * 20]`` of ``d``, ``m`` ``[rows, blocks]`` and codes
    ``q`` ``[rows, blocks * 32]`` (0..15): ``w = d * q + m``."""
    rows, cols = q.shape
    qb = q.reshape(rows, cols // 32, 32)
    block = torch.cat((_f16_bytes(d), _f16_bytes(m), _pack_nibbles(qb)), dim=-1)
    return block.reshape(rows, -1)


def q4_0_blocks(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, blocks * 18]``: ``w = d * (q - 8)``."""
    rows, cols = q.shape
    qb = q.reshape(rows, cols // 32, 32)
    return torch.cat((_f16_bytes(d), _pack_nibbles(qb)), dim=-1).reshape(rows, -1)


def q8_0_blocks(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, blocks * 34]``: ``w = d * q``, ``q`` int8."""
    rows, cols = q.shape
    qb = q.to(torch.int8).reshape(rows, cols // 32, 32).contiguous().view(torch.uint8)
    return torch.cat((_f16_bytes(d), qb), dim=-1).reshape(rows, -1)


def random_packed(fmt: str, rows: int, cols: int, seed: int = 0) -> PackedWeight:
    """Blocks of random scales and codes, as a loader would hand them over."""
    gen = torch.Generator().manual_seed(seed)
    nb = cols // 32
    d = (torch.rand(rows, nb, generator=gen) * 0.02 + 0.001).half().float()
    if fmt == "q4_1":
        m = (-(torch.rand(rows, nb, generator=gen)) * 0.15).half().float()
        q = torch.randint(0, 16, (rows, cols), generator=gen)
        data = q4_1_blocks(d, m, q)
    elif fmt == "q4_0":
        q = torch.randint(0, 16, (rows, cols), generator=gen)
        data = q4_0_blocks(d, q)
    else:
        q = torch.randint(-127, 128, (rows, cols), generator=gen)
        data = q8_0_blocks(d * 0.1, q)
    return PackedWeight(fmt, data, (rows, cols))
