"""A fast reader of GGUF files: metadata, tensor table and (dequantized) tensors.

``gguf.GGUFReader`` builds one numpy view per vocabulary string, which costs seconds on
a 49k-token vocabulary; this reader parses the same layout with ``struct`` over one
in-memory copy of the file and keeps the ``gguf`` package's type tables. Dequantization
of the common block formats (Q4_0, Q4_1, Q8_0) runs in torch, multi-threaded, with the
same arithmetic as ``gguf.quants`` (checked in the tests); every other format goes
through ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["GGUFFile", "GGUFTensor", "dequantize"]

_MAGIC = b"GGUF"

# scalar value types of the GGUF key/value section: type id -> (struct format, width)
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY: dict[int, str] = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table."""

    name: str
    shape: tuple[int, ...]  # torch order (the file stores it reversed)
    ggml_type: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset of the data in the file
    num_bytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name


class GGUFFile:
    """Metadata (``.metadata``: key -> python value) and tensors of one GGUF file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            self._buf = bytearray(size)
            view = memoryview(self._buf)
            read = 0
            while read < size:
                n = f.readinto(view[read:])
                if not n:
                    break
                read += n
        if bytes(self._buf[:4]) != _MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic)")
        self._pos = 4
        self.version = self._u32()
        if self.version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {self.version} is not supported (2, 3)")
        num_tensors = self._u64()
        num_kv = self._u64()
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self._str()
            vtype = self._u32()
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(num_tensors):
            name = self._str()
            ndim = self._u32()
            dims = struct.unpack_from(f"<{ndim}Q", self._buf, self._pos)
            self._pos += 8 * ndim
            ggml_type = self._u32()
            offset = self._u64()
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.tensors: dict[str, GGUFTensor] = {}
        for name, shape, ggml_type, offset in infos:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            count = int(np.prod(shape)) if shape else 1
            self.tensors[name] = GGUFTensor(
                name, shape, ggml_type, data_start + offset, count // block * type_size
            )

    # ------------------------------------------------------------------ parsing

    def _u32(self) -> int:
        (v,) = struct.unpack_from("<I", self._buf, self._pos)
        self._pos += 4
        return int(v)

    def _u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self._buf, self._pos)
        self._pos += 8
        return int(v)

    def _str(self) -> str:
        n = self._u64()
        s = self._buf[self._pos : self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._str()
        if vtype == _ARRAY:
            item = self._u32()
            count = self._u64()
            if item == _STRING:
                buf, pos, out = self._buf, self._pos, []
                unpack = struct.unpack_from
                for _ in range(count):
                    (n,) = unpack("<Q", buf, pos)
                    pos += 8
                    out.append(buf[pos : pos + n].decode("utf-8", errors="replace"))
                    pos += n
                self._pos = pos
                return out
            if item in _NUMPY:
                width = _SCALARS[item][1]
                arr = np.frombuffer(self._buf, dtype=_NUMPY[item], count=count, offset=self._pos)
                self._pos += width * count
                return arr.tolist()
            return [self._value(item) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF value type {vtype}")
        fmt, width = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += width
        return v

    # ------------------------------------------------------------------ tensors

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes of tensor ``name`` (uint8, shares memory with the file copy)."""
        t = self.tensors[name]
        return torch.frombuffer(self._buf, dtype=torch.uint8, count=t.num_bytes, offset=t.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantized to float32 in torch order."""
        t = self.tensors[name]
        return dequantize(self.raw(name), t.ggml_type, t.shape)


def _f16(col: torch.Tensor) -> torch.Tensor:
    return col.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # a block's low nibbles are its first half, the high nibbles its second half
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 values of ``raw`` (the stored bytes of a tensor of ``shape``)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qt = GGMLQuantizationType(ggml_type)
    if qt == GGMLQuantizationType.F32:
        return raw.view(torch.float32).reshape(shape).clone()
    if qt == GGMLQuantizationType.F16:
        return raw.view(torch.float16).reshape(shape).float()
    if qt == GGMLQuantizationType.BF16:
        return raw.view(torch.bfloat16).reshape(shape).float()
    block, type_size = GGML_QUANT_SIZES[qt]
    blocks = raw.view(-1, type_size)
    if qt == GGMLQuantizationType.Q8_0:
        d = _f16(blocks[:, :2])
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(shape)
    if qt == GGMLQuantizationType.Q4_1:
        d = _f16(blocks[:, :2])
        m = _f16(blocks[:, 2:4])
        q = _nibbles(blocks[:, 4:]).float()
        return (d * q + m).reshape(shape)
    if qt == GGMLQuantizationType.Q4_0:
        d = _f16(blocks[:, :2])
        q = (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float()
        return (d * q).reshape(shape)
    from gguf.quants import dequantize as gguf_dequantize

    values = gguf_dequantize(raw.numpy().reshape(-1, type_size), qt)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
