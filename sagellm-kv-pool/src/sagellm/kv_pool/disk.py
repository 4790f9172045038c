"""DiskBlockStore: KV blocks in one fixed-size file, block ``i`` at ``i * block_bytes``."""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Sequence

import numpy as np

from sagellm.core.errors import ConfigError
from sagellm.kv_pool.allocator import BlockAllocator
from sagellm.kv_pool.config import DEFAULT_DISK_BYTES, DiskTierConfig
from sagellm.kv_pool.transfer import id_runs

__all__ = ["DiskBlockStore"]


def _close(fd: int, path: str) -> None:
    try:
        os.close(fd)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class DiskBlockStore(BlockAllocator):
    """A block allocator whose storage is one preallocated file.

    The file is created (``mkstemp``) in ``config.directory`` or the system temp dir, sized
    to ``num_blocks * block_bytes`` with ``ftruncate`` (sparse) or ``posix_fallocate``
    (``preallocate=True``), and removed by :meth:`close` (or when the store is garbage
    collected). Each block's bytes are contiguous in the file, in the block-major layout
    of :meth:`PagedKVPool.gather_blocks`; a run of consecutive block ids is read or
    written with one ``preadv``/``pwrite`` call. Writes land in the page cache (no fsync):
    the tier holds evicted KV for the life of the process, not across restarts.
    """

    def __init__(self, config: DiskTierConfig, *, block_bytes: int, tier: str = "disk") -> None:
        if config.num_blocks is not None:
            num_blocks = config.num_blocks
        else:
            size = config.size_bytes if config.size_bytes is not None else DEFAULT_DISK_BYTES
            num_blocks = size // block_bytes
            if num_blocks < 1:
                raise ConfigError(
                    f"disk tier size_bytes={size} holds no block of {block_bytes} bytes; "
                    "give a larger size_bytes or num_blocks"
                )
        super().__init__(num_blocks, tier=tier, block_bytes=block_bytes)
        if config.directory is not None and not os.path.isdir(config.directory):
            raise ConfigError(
                f"disk tier directory {config.directory!r} does not exist; create it or "
                "leave directory unset to use the system temp dir"
            )
        fd, path = tempfile.mkstemp(prefix="sagellm-kv-", suffix=".blocks", dir=config.directory)
        self._fd = fd
        self._path = path
        self._finalizer = weakref.finalize(self, _close, fd, path)
        size_bytes = num_blocks * block_bytes
        try:
            if config.preallocate and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size_bytes)
            else:
                os.ftruncate(fd, size_bytes)
        except OSError as exc:
            self._finalizer()
            raise ConfigError(
                f"cannot size the disk tier file {path} to {size_bytes} bytes: {exc}; "
                "choose a smaller disk tier or another directory"
            ) from exc

    @property
    def path(self) -> str:
        """Path of the backing file."""
        return self._path

    @property
    def closed(self) -> bool:
        """True once :meth:`close` removed the file."""
        return not self._finalizer.alive

    def close(self) -> None:
        """Close and delete the backing file; idempotent."""
        self._finalizer()

    def write_blocks(self, block_ids: Sequence[int], data: np.ndarray) -> None:
        """Write row ``i`` of ``data`` (uint8 ``[len(block_ids), block_bytes]``) to block ``i``."""
        self._check_buffer(block_ids, data)
        bb = self._block_bytes
        view = data.data.cast("B")
        for pos, first, length in id_runs(block_ids):
            chunk = view[pos * bb : (pos + length) * bb]
            offset = first * bb
            while chunk:
                written = os.pwrite(self._fd, chunk, offset)
                chunk = chunk[written:]
                offset += written

    def read_blocks(self, block_ids: Sequence[int], out: np.ndarray) -> None:
        """Read block ``block_ids[i]`` into row ``i`` of ``out`` (uint8, C-contiguous)."""
        self._check_buffer(block_ids, out)
        bb = self._block_bytes
        view = out.data.cast("B")
        for pos, first, length in id_runs(block_ids):
            chunk = view[pos * bb : (pos + length) * bb]
            offset = first * bb
            while chunk:
                got = os.preadv(self._fd, [chunk], offset)
                if got == 0:
                    raise OSError(f"disk tier file {self._path} ended early at byte {offset}")
                chunk = chunk[got:]
                offset += got

    def _check_buffer(self, block_ids: Sequence[int], buf: np.ndarray) -> None:
        if self.closed:
            raise ValueError(f"the disk tier file {self._path} is closed")
        if buf.dtype != np.uint8 or not buf.flags.c_contiguous:
            raise ValueError("disk tier buffers must be C-contiguous uint8 arrays")
        if buf.nbytes != len(block_ids) * self._block_bytes:
            raise ValueError(
                f"buffer holds {buf.nbytes} bytes, {len(block_ids)} blocks need "
                f"{len(block_ids) * self._block_bytes}"
            )

    def _move_content(self, src_ids: list[int], dst_ids: list[int]) -> None:
        buf = np.empty((len(src_ids), self._block_bytes), dtype=np.uint8)
        self.read_blocks(src_ids, buf)
        self.write_blocks(dst_ids, buf)

    def __repr__(self) -> str:
        return (
            f"DiskBlockStore(num_blocks={self.num_blocks}, free={self.num_free_blocks}, "
            f"path={self._path!r})"
        )
