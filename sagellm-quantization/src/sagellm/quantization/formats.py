"""Weight formats: GGUF block decoding, round-to-nearest quantization, CPU int4/int8 packing.

Conventions of torch's CPU weight-only kernels (torch 2.13):

* ``_weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zeros)`` computes with
  ``w = (q - 8) * scale + zero`` per group of ``group_size`` columns, ``q`` in 0..15,
  ``scale_zeros`` ``[K / group_size, N, 2]`` in ``x``'s dtype, group sizes 32, 64, 128
  or 256 dividing ``K``;
* ``_weight_int8pack_mm(x, q, scales)`` computes ``x @ (q * scales[:, None]).T`` with one
  scale per output row (``x``'s dtype).

GGUF blocks map onto them: a Q4_1 block (``w = d * q + m``, 32 weights) is the int4
layout with ``scale = d`` and ``zero = m + 8 d``; a Q4_0 block (``w = d * (q - 8)``) has
``zero = 0``. Q8_0 (one scale per 32 weights) has no per-group int8 kernel; its closest
packed form is int8 with one scale per row, re-rounded from the decoded values.
"""

from __future__ import annotations

import torch

__all__ = [
    "INT4_GROUP_SIZES",
    "decode_blocks",
    "int4_from_gguf",
    "int4_levels",
    "int4_params",
    "int4_round",
    "int4_rtn",
    "int8_rtn",
    "pack_int4",
    "q8_0_values",
    "unpack_int4",
]

#: Group sizes torch's CPU int4 kernel accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)

# bytes per 32-weight block of each GGUF format
_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


def _f16(col: torch.Tensor) -> torch.Tensor:
    return col.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # llama.cpp stores weight j of a block in the low nibble of byte j, weight j+16 in
    # the high nibble
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _blocks(fmt: str, data: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if fmt not in _BLOCK_BYTES:
        raise ValueError(f"GGUF format {fmt!r} is not supported; supported: {sorted(_BLOCK_BYTES)}")
    rows, cols = shape
    if cols % 32:
        raise ValueError(f"a {fmt} weight needs a multiple of 32 columns, got {cols}")
    size = _BLOCK_BYTES[fmt]
    if tuple(data.shape) != (rows, cols // 32 * size) or data.dtype != torch.uint8:
        raise ValueError(
            f"{fmt} blocks of a {rows}x{cols} weight are uint8 [{rows}, {cols // 32 * size}], "
            f"got {data.dtype} {list(data.shape)}"
        )
    return data.reshape(rows, cols // 32, size)


def decode_blocks(fmt: str, data: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Float32 ``[rows, cols]`` of GGUF blocks ``data`` (uint8 ``[rows, bytes per row]``)."""
    b = _blocks(fmt, data, shape)
    d = _f16(b[..., :2])
    if fmt == "q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(shape)
    if fmt == "q4_1":
        m = _f16(b[..., 2:4])
        return (_nibbles(b[..., 4:]).float() * d + m).reshape(shape)
    return ((_nibbles(b[..., 2:]).float() - 8) * d).reshape(shape)


def q8_0_values(data: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [rows, cols], d float32 [rows, cols/32])`` of Q8_0 blocks: ``w = q * d``."""
    b = _blocks("q8_0", data, shape)
    d = _f16(b[..., :2])[..., 0]
    q = b[..., 2:].contiguous().view(torch.int8).reshape(shape)
    return q, d


def int4_from_gguf(
    fmt: str, data: torch.Tensor, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q int32 [rows, cols] in 0..15, scale [rows, cols/32], zero [rows, cols/32])``
    (float32) of Q4_0 / Q4_1 blocks, exact: ``w = (q - 8) * scale + zero``."""
    if fmt not in ("q4_0", "q4_1"):
        raise ValueError(f"only q4_0 and q4_1 blocks map onto the int4 kernel, not {fmt!r}")
    b = _blocks(fmt, data, shape)
    d = _f16(b[..., :2])[..., 0]
    if fmt == "q4_1":
        m = _f16(b[..., 2:4])[..., 0]
        q = _nibbles(b[..., 4:])
        zero = m + 8 * d
    else:
        q = _nibbles(b[..., 2:])
        zero = torch.zeros_like(d)
    return q.reshape(shape).to(torch.int32), d, zero


def int4_levels(bits: int, symmetric: bool) -> tuple[int, int]:
    """The ``(lowest, highest)`` code of a ``bits``-bit grid inside the kernel's 0..15.

    Asymmetric grids use codes ``0 .. 2**bits - 1``; symmetric ones are centred on the
    kernel's zero point 8 (``8 - 2**(bits-1) .. 8 + 2**(bits-1) - 1``), so ``zero = 0``.
    3-bit weights run on the same kernel (no fewer bytes, eight levels).
    """
    if bits not in (2, 3, 4):
        raise ValueError(f"the int4 kernel holds 2, 3 or 4-bit codes, not {bits}-bit")
    levels = 1 << bits
    if symmetric:
        return 8 - levels // 2, 8 + levels // 2 - 1
    return 0, levels - 1


def int4_params(
    groups: torch.Tensor, bits: int = 4, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` of float ``groups`` ``[..., g]`` (one pair per group).

    Asymmetric: the group's minimum and maximum map onto the lowest and highest code
    (``zero = min + 8 * scale`` in the kernel's ``(q - 8) * scale + zero`` form);
    symmetric: ``scale = 2 * max|w| / (2**bits - 1)``, ``zero = 0`` (GPTQ's convention).
    """
    lo_code, hi_code = int4_levels(bits, symmetric)
    steps = hi_code - lo_code
    g = groups.float()
    if symmetric:
        scale = (2 * g.abs().amax(dim=-1) / steps).clamp_min(1e-8)
        return scale, torch.zeros_like(scale)
    lo = g.amin(dim=-1)
    hi = g.amax(dim=-1)
    scale = ((hi - lo) / steps).clamp_min(1e-8)
    return scale, lo + (8 - lo_code) * scale


def int4_round(
    groups: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int = 4,
    symmetric: bool = False,
) -> torch.Tensor:
    """Codes (int32, in :func:`int4_levels`' range) nearest to ``groups`` ``[..., g]`` on
    the grid ``(q - 8) * scale + zero`` (``scale``/``zero`` ``[...]``, one per group)."""
    lo_code, hi_code = int4_levels(bits, symmetric)
    s = scale.unsqueeze(-1)
    q = ((groups.float() - zero.unsqueeze(-1)) / s + 8).round_().clamp_(lo_code, hi_code)
    return q.to(torch.int32)


def int4_rtn(
    w: torch.Tensor, group_size: int, *, bits: int = 4, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of float ``w`` ``[N, K]`` per group of ``group_size`` columns.

    Returns ``(q int32 [N, K], scale [N, K/g], zero [N, K/g])`` (float32) with
    ``w ~ (q - 8) * scale + zero``. Asymmetric (the default) represents each group's
    minimum and maximum up to rounding of the scale; ``bits=3`` uses eight codes.
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the {k} input columns")
    g = w.float().reshape(n, k // group_size, group_size)
    scale, zero = int4_params(g, bits, symmetric)
    q = int4_round(g, scale, zero, bits, symmetric)
    return q.reshape(n, k), scale, zero


def int8_rtn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of float ``w`` ``[N, K]``: ``(q int8, scale float32 [N])``."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = (wf / scale.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def pack_int4(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [N, K/2], scale_zeros [K/g, N, 2] in dtype)`` for the CPU kernel."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    scale_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, scale_zeros


def unpack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float32 weight ``(q - 8) * scale + zero`` (the reference the kernel must match)."""
    n, k = q.shape
    groups = scale.shape[1]
    wq = (q.float() - 8).reshape(n, groups, k // groups)
    return (wq * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(n, k)
