"""Shared-memory all-reduce, all-gather and exchange for ranks on one host.

One segment per group, created by rank 0 and mapped by every rank, then unlinked at
once: it lives while mapped, and a rank that dies leaves nothing behind in /dev/shm.

Layout: a header of per-rank step counters (one 64-byte line each, two phases), then
two parity banks of ``world_size`` slots of ``slot_bytes`` (each rank writes only its
own slot), then two parity banks of one result area. Step ``s`` uses bank ``s % 2``:
a rank may overwrite bank ``p`` at step ``s`` because every peer has announced step
``s - 1``, which it does only after it finished reading bank ``p`` at step ``s - 2``. So
one flag round per phase suffices and no trailing barrier is needed.

A rank writes its data, then its counter. On x86-64 (total store order) the peer that
sees the counter also sees the data; other architectures are refused and the backend
falls back to torch.distributed.

Algorithms (``all_reduce``):

- ``shm_flat``: every rank copies its tensor into its slot, one flag round, then every
  rank reduces all slots in rank order into its tensor. One round; ``(W + 3) n`` bytes of
  memory traffic per rank. Best for small messages.
- ``shm_direct``: reduce-scatter then all-gather without a full copy-in. Each rank
  copies the chunks other ranks reduce into its slot, reduces its own chunk (its own
  tensor plus the peers' slots) into the result area, then after a second flag round
  copies the whole result back. Two rounds, about ``4.5 n`` bytes at two ranks.

Every rank gets bit-identical results: ``shm_flat`` adds in rank order everywhere,
``shm_direct`` has one reducer per chunk.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "ALGORITHMS",
    "REDUCE_OPS",
    "Segment",
    "ShmGroup",
    "process_alive",
    "segment_bytes",
    "shm_supported",
]

#: Element-wise reduction of each op name: fn(a, b, out=...).
REDUCE_OPS: dict[str, Callable[..., Any]] = {
    "sum": torch.add,
    "max": torch.maximum,
    "min": torch.minimum,
    "product": torch.mul,
}
ALGORITHMS = ("shm_flat", "shm_direct")

_LINE = 64  # bytes per counter: one cache line, no false sharing
_Q = _LINE // 8  # int64 entries per line
_ALIGN = 64  # chunk boundaries in bytes
_SPINS_BEFORE_YIELD = 2000  # polls before giving the core away (ranks may share a core)
_MAX_CACHED = 256  # cached view sets (distinct message sizes) before the cache is reset


def shm_supported() -> bool:
    """Shared-memory collectives need total store order: x86-64 only."""
    return platform.machine().lower() in ("x86_64", "amd64")


SHM_DIR = "/dev/shm"


class Segment:
    """A POSIX shared-memory file under /dev/shm, mapped; no resource tracker involved.

    ``multiprocessing.shared_memory`` registers every mapping with a tracker process that
    unlinks (and warns) at exit; here the creator unlinks once all ranks have mapped it.
    """

    def __init__(self, name: str, size: int, *, create: bool) -> None:
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            size = os.fstat(fd).st_size
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size)
        except BaseException:
            if create:
                os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.size = size
        self.buf: memoryview | None = memoryview(self._mmap)
        self.linked = create

    def unlink(self) -> None:
        """Remove the name (the mapping stays until every rank closes it)."""
        if self.linked:
            self.linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        self.unlink()


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: assume it runs, the timeout still tells
        return True
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


class ShmGroup:
    """Collectives over one shared segment. Build it with :meth:`attach` on every rank."""

    def __init__(
        self,
        segment: Segment,
        rank: int,
        world_size: int,
        slot_bytes: int,
        timeout_s: float,
        *,
        peer_pids: Sequence[int] | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s
        # every rank's pid: a wait gives up at once when the rank it waits for has exited
        # (None: only the timeout tells)
        self.peer_pids = list(peer_pids) if peer_pids is not None else None
        self._segment: Segment | None = segment
        self._header = _header_bytes(world_size)
        buf = segment.buf
        assert buf is not None
        self._flags = buf[: self._header].cast("q")
        self._bytes = torch.frombuffer(
            buf, dtype=torch.uint8, count=segment_bytes(world_size, slot_bytes)
        )
        self._views: dict[tuple[str, torch.dtype, int], torch.Tensor] = {}
        self._views_by_size: dict[tuple[Any, ...], Any] = {}
        self._seq = 0
        self.num_steps = 0  # flag rounds done (telemetry)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def create_segment(world_size: int, slot_bytes: int) -> Segment:
        """A zeroed segment for ``world_size`` ranks (rank 0 calls this)."""
        name = f"sagellm_{uuid.uuid4().hex[:16]}"
        return Segment(name, segment_bytes(world_size, slot_bytes), create=True)

    @staticmethod
    def open_segment(name: str) -> Segment:
        """Map the segment rank 0 created; the creator alone unlinks it."""
        if "/" in name or not name.startswith("sagellm_"):
            raise ValueError(f"not a sageLLM segment name: {name!r}")
        return Segment(name, 0, create=False)

    # ------------------------------------------------------------------ views
    def _slots(self, dtype: torch.dtype, parity: int) -> torch.Tensor:
        key = ("slots", dtype, parity)
        view = self._views.get(key)
        if view is None:
            w, size = self.world_size, self.slot_bytes
            start = self._header + parity * w * size
            view = self._bytes[start : start + w * size].view(dtype).view(w, -1)
            self._views[key] = view
        return view

    def _result(self, dtype: torch.dtype, parity: int) -> torch.Tensor:
        key = ("result", dtype, parity)
        view = self._views.get(key)
        if view is None:
            w, size = self.world_size, self.slot_bytes
            start = self._header + 2 * w * size + parity * size
            view = self._bytes[start : start + size].view(dtype)
            self._views[key] = view
        return view

    # ------------------------------------------------------------------ flags
    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _post(self, phase: int, step: int) -> None:
        self._flags[(phase * self.world_size + self.rank) * _Q] = step

    def _wait(self, phase: int, step: int, what: str) -> None:
        flags = self._flags
        base = phase * self.world_size
        for r in range(self.world_size):
            i = (base + r) * _Q
            if flags[i] >= step:
                continue
            spins = 0
            deadline = 0.0
            while flags[i] < step:
                spins += 1
                if spins <= _SPINS_BEFORE_YIELD:
                    continue
                os.sched_yield()  # ranks may share a core: let the peer run
                if spins & 1023 == 0:
                    if self.peer_pids is not None and not process_alive(self.peer_pids[r]):
                        raise RuntimeError(
                            f"rank {r} (pid {self.peer_pids[r]}) exited during a shared-memory "
                            f"{what} on rank {self.rank}"
                        )
                    now = time.monotonic()
                    if not deadline:
                        deadline = now + self.timeout_s
                    elif now > deadline:
                        raise TimeoutError(
                            f"shared-memory {what} on rank {self.rank} waited "
                            f"{self.timeout_s:.0f} s for rank {r} (at step {flags[i]}, "
                            f"this rank at {step}): a rank stopped or skipped a collective"
                        )
        self.num_steps += 1

    def _round(self, phase: int, step: int, what: str) -> None:
        self._post(phase, step)
        self._wait(phase, step, what)

    # ------------------------------------------------------------------ collectives
    def elements_per_round(self, tensor: torch.Tensor) -> int:
        """How many elements of ``tensor``'s dtype one slot holds."""
        return self.slot_bytes // tensor.element_size()

    def all_reduce(self, flat: torch.Tensor, op: str, algorithm: str) -> None:
        """Reduce the contiguous 1-D CPU tensor ``flat`` in place (slot-sized rounds)."""
        fn = REDUCE_OPS[op]
        per = self.elements_per_round(flat)
        n = flat.numel()
        run = self._flat_round if algorithm == "shm_flat" else self._direct_round
        if n <= per:
            run(flat, fn)
            return
        for start in range(0, n, per):
            run(flat[start : start + per], fn)

    def _cached(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        # views of the segment per (algorithm, dtype, parity, size): a model calls the same
        # shapes every step, and slicing costs more than the copy at small sizes
        views = self._views_by_size.get(key)
        if views is None:
            if len(self._views_by_size) >= _MAX_CACHED:
                self._views_by_size.clear()
            views = build()
            self._views_by_size[key] = views
        return views

    def _flat_round(self, piece: torch.Tensor, fn: Callable[..., Any]) -> None:
        step = self._next()
        parity = step & 1
        m = piece.numel()
        rank = self.rank

        def build() -> list[torch.Tensor]:
            slots = self._slots(piece.dtype, parity)
            return [slots[i, :m] for i in range(self.world_size)]

        mine = self._cached(("flat", piece.dtype, parity, m), build)
        mine[rank].copy_(piece)
        self._round(0, step, "all_reduce")
        # own tensor for ranks 0 and 1 (still unchanged at the first op); slots otherwise,
        # so every rank adds in rank order and gets the same bits
        a = piece if rank == 0 else mine[0]
        b = piece if rank == 1 else mine[1]
        fn(a, b, out=piece)
        for src in mine[2:]:
            fn(piece, src, out=piece)

    def _chunk(self, m: int, r: int, itemsize: int) -> tuple[int, int]:
        align = max(1, _ALIGN // itemsize)
        c = -(-m // self.world_size)
        c = -(-c // align) * align
        return min(r * c, m), min((r + 1) * c, m)

    def _direct_round(self, piece: torch.Tensor, fn: Callable[..., Any]) -> None:
        step = self._next()
        parity = step & 1
        m = piece.numel()
        rank = self.rank
        lo, hi = self._chunk(m, rank, piece.element_size())

        def build() -> tuple[Any, ...]:
            slots = self._slots(piece.dtype, parity)
            result = self._result(piece.dtype, parity)
            return (
                slots[rank, :lo],
                slots[rank, hi:m],
                [slots[i, lo:hi] for i in range(self.world_size)],
                result[lo:hi],
                result[:m],
            )

        head, tail, chunks, out, whole = self._cached(("direct", piece.dtype, parity, m), build)
        if lo > 0:
            head.copy_(piece[:lo])
        if hi < m:
            tail.copy_(piece[hi:])
        self._round(0, step, "all_reduce")
        if hi > lo:
            own = piece[lo:hi]
            srcs = [own if i == rank else chunks[i] for i in range(self.world_size)]
            fn(srcs[0], srcs[1], out=out)
            for src in srcs[2:]:
                fn(out, src, out=out)
        self._round(1, step, "all_reduce")
        piece.copy_(whole)

    def _gather_views(
        self, dtype: torch.dtype, parity: int, m: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def build() -> tuple[torch.Tensor, torch.Tensor]:
            slots = self._slots(dtype, parity)
            return slots[self.rank, :m], slots[:, :m]

        views: tuple[torch.Tensor, torch.Tensor] = self._cached(("gather", dtype, parity, m), build)
        return views

    def all_gather(self, output: torch.Tensor, flat: torch.Tensor) -> None:
        """``output`` (contiguous, ``world_size * n`` elements) gets every rank's ``flat``."""
        n = flat.numel()
        out2d = output.view(self.world_size, n)
        per = self.elements_per_round(flat)
        for start in range(0, n, per):
            m = min(per, n - start)
            step = self._next()
            mine, every = self._gather_views(flat.dtype, step & 1, m)
            mine.copy_(flat if m == n else flat[start : start + m])
            self._round(0, step, "all_gather")
            (out2d if m == n else out2d[:, start : start + m]).copy_(every)

    def exchange(self, out: torch.Tensor, flat: torch.Tensor) -> None:
        """Send ``flat`` to rank ``rank + 1`` and receive rank ``rank - 1``'s into ``out``.

        The point-to-point copy through the same segment: the ceiling the collectives'
        bus bandwidth is judged against.
        """
        src = (self.rank - 1) % self.world_size
        per = self.elements_per_round(flat)
        n = flat.numel()
        for start in range(0, n, per):
            m = min(per, n - start)
            step = self._next()
            mine, every = self._gather_views(flat.dtype, step & 1, m)
            mine.copy_(flat if m == n else flat[start : start + m])
            self._round(0, step, "exchange")
            (out if m == n else out[start : start + m]).copy_(every[src])

    def barrier(self) -> None:
        """Every rank has reached this call."""
        self._round(0, self._next(), "barrier")

    def close(self) -> None:
        """Drop the views and unmap the segment (idempotent)."""
        if self._segment is None:
            return
        self._views.clear()
        self._views_by_size.clear()
        del self._bytes
        self._flags.release()
        self._segment.close()
        self._segment = None


def _header_bytes(world_size: int) -> int:
    return -(-(2 * world_size * _LINE) // 4096) * 4096


def segment_bytes(world_size: int, slot_bytes: int) -> int:
    """Size of the segment for ``world_size`` ranks with ``slot_bytes`` slots."""
    return _header_bytes(world_size) + 2 * world_size * slot_bytes + 2 * slot_bytes
