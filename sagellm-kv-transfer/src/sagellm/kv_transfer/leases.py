"""Leases on offered blocks: a producer keeps them until acknowledged or expired.

Anchor: vLLM's NixlConnector, whose prefill side frees a request's blocks on the decode
side's notification or when ``kv_lease_duration`` runs out. Here a load start renews the
lease, a transfer in progress on this side is never reaped, and the table only decides:
the channel frees the returned blocks in the caller's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Lease", "LeaseTable"]


@dataclass(slots=True)
class Lease:
    """One offered request."""

    request_id: str
    block_ids: tuple[int, ...]
    owned: bool  # True: the channel holds the references and frees them
    deadline: float  # monotonic time after which an idle lease expires
    busy: int = 0  # transfers of it running on this side now
    acked: bool = False  # the consumer acknowledged it
    served: int = 0  # transfers of it completed


class LeaseTable:
    """Offered requests by id; thread-safe (the transfer thread and the caller share it)."""

    def __init__(self, lease_s: float) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.lease_s = lease_s
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def __contains__(self, request_id: object) -> bool:
        with self._lock:
            return request_id in self._leases

    def offer(self, request_id: str, block_ids: Sequence[int], owned: bool, now: float) -> None:
        """Start a lease; an id already offered is a caller bug (``ValueError``)."""
        with self._lock:
            if request_id in self._leases:
                raise ValueError(
                    f"request {request_id!r} is already offered; a request is offered once"
                )
            self._leases[request_id] = Lease(
                request_id, tuple(block_ids), owned, now + self.lease_s
            )

    def begin(self, request_id: str, block_ids: Sequence[int], now: float) -> str | None:
        """A load of ``block_ids`` of ``request_id`` starts; renews the lease.

        Returns ``None`` when allowed, else why not (unknown, acknowledged or expired
        request, blocks it does not hold).
        """
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                return f"request {request_id!r} is not offered (never, or already released)"
            if lease.acked:
                return f"request {request_id!r} was already acknowledged"
            if lease.busy == 0 and now > lease.deadline:
                return f"the lease of request {request_id!r} expired"
            held = set(lease.block_ids)
            stray = [b for b in block_ids if b not in held]
            if stray:
                return f"request {request_id!r} does not hold block(s) {stray}"
            lease.busy += 1
            lease.deadline = max(lease.deadline, now + self.lease_s)
            return None

    def end(self, request_id: str, now: float, ok: bool) -> None:
        """A transfer begun by :meth:`begin` is over (sent, or failed)."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                return
            lease.busy -= 1
            lease.served += int(ok)
            lease.deadline = max(lease.deadline, now + self.lease_s) if ok else lease.deadline

    def ack(self, request_id: str) -> bool:
        """The consumer acknowledged the request; False when it is not offered."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                return False
            lease.acked = True
            return True

    def served(self, request_id: str) -> int:
        """Completed transfers of a request (0 when unknown)."""
        with self._lock:
            lease = self._leases.get(request_id)
            return 0 if lease is None else lease.served

    def release_due(self, now: float) -> list[Lease]:
        """Remove and return every lease that is acknowledged or expired and idle."""
        with self._lock:
            due = [
                lease
                for lease in self._leases.values()
                if lease.busy == 0 and (lease.acked or now > lease.deadline)
            ]
            for lease in due:
                del self._leases[lease.request_id]
            return due

    def release_all(self) -> list[Lease]:
        """Remove and return every lease (closing the channel)."""
        with self._lock:
            leases = list(self._leases.values())
            self._leases.clear()
            return leases
