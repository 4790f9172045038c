"""Alpha-beta link costs: NCCL's figures as priors, refit from a micro-benchmark.

A message of ``n`` bytes over a link takes ``alpha + n / beta`` (``alpha`` in
microseconds, ``beta`` in GB/s), the model of NCCL's ``ncclTopoGetAlgoTime``.

Priors (NCCL ``src/graph/topo.h`` bandwidths, ``tuning.cc`` ring/simple hardware
latencies): NVLink 20 GB/s per link (SM80), 3.4 us; PCIe ``width * code / 80`` GB/s with
code 15/30/60/120/240/480 for 2.5/5/8/16/32/64 GT/s (so Gen3 x16 = 12 GB/s), 5.7 us;
inter-socket Intel 10 GB/s (Skylake QPI), AMD and Hygon 16, Zhaoxin 9; network 12 GB/s
(100 Gbit) when the NIC gives no speed, 14 us. Shared memory inside one NUMA node uses
NCCL's PCI figures (12 GB/s, 5.7 us) until :func:`calibrate_shm` measures it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "LATENCY_US",
    "LinkCost",
    "fit_alpha_beta",
    "inter_socket_gbps",
    "measure_shm_pingpong",
    "pcie_gbps",
]

#: NCCL ring/simple hardware latency (tuning.cc ``hwLat``) by link family, microseconds.
LATENCY_US: dict[str, float] = {"nvlink": 3.4, "pcie": 5.7, "net": 14.0}

# NCCL's per-lane speed codes (xml.cc): bandwidth = width * code / 80 GB/s.
_PCIE_CODE = {2.5: 15, 5.0: 30, 8.0: 60, 16.0: 120, 32.0: 240, 64.0: 480}
_PCI_BW_DEFAULT = 12.0  # topo.h PCI_BW: Gen3 x16
NET_BW_DEFAULT = 12.0  # topo.h NET_BW: 100 Gbit
NVLINK_BW_PER_LINK = 20.0  # topo.h SM80_NVLINK_BW
_QPI = {"GenuineIntel": 10.0, "AuthenticAMD": 16.0, "HygonGenuine": 16.0, "CentaurHauls": 9.0}
_QPI_DEFAULT = 10.0


@dataclass(frozen=True, slots=True)
class LinkCost:
    """``alpha`` microseconds plus ``n / beta`` for ``n`` bytes."""

    alpha_us: float  # fixed cost per message
    beta_gbps: float  # sustained bandwidth, GB/s (1e9 bytes per second)

    def time_us(self, nbytes: int) -> float:
        """Modelled time of one message of ``nbytes`` bytes, microseconds."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        return self.alpha_us + nbytes / (self.beta_gbps * 1e3)


def pcie_gbps(speed_gts: float | None, width: int | None) -> float:
    """NCCL's PCIe bandwidth of a link; Gen3 x16 (12 GB/s) for what sysfs leaves out."""
    if speed_gts is None or not width:
        return _PCI_BW_DEFAULT
    code = _PCIE_CODE.get(float(speed_gts))
    if code is None:  # a speed NCCL has no entry for: scale Gen3's code
        code = int(round(60 * speed_gts / 8.0))
    return width * code / 80.0


def inter_socket_gbps(cpu_vendor: str) -> float:
    """NCCL's inter-socket bandwidth prior for this CPU vendor."""
    return _QPI.get(cpu_vendor.strip(), _QPI_DEFAULT)


def fit_alpha_beta(sizes: Sequence[int], times_us: Sequence[float]) -> LinkCost:
    """Least-squares ``t = alpha + n / beta`` over (size, time) points.

    Needs at least two distinct sizes; a fitted slope that is not positive (times that
    do not grow with size) raises ``ValueError`` saying to measure larger sizes.
    Alpha is clamped at 0 (a negative intercept is noise).
    """
    if len(sizes) != len(times_us):
        raise ValueError(f"{len(sizes)} sizes but {len(times_us)} times")
    if len(set(sizes)) < 2:
        raise ValueError("fit_alpha_beta needs at least two distinct message sizes")
    n = len(sizes)
    mx = sum(sizes) / n
    my = sum(times_us) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    sxy = sum((x - mx) * (y - my) for x, y in zip(sizes, times_us))
    slope = sxy / sxx  # microseconds per byte
    if not slope > 0 or not math.isfinite(slope):
        raise ValueError(
            f"times do not grow with size (slope {slope:.3g} us/byte): measure larger sizes"
        )
    alpha = max(0.0, my - slope * mx)
    return LinkCost(alpha_us=alpha, beta_gbps=1.0 / (slope * 1e3))


# Polls of a flag before giving the core away: enough to catch a peer running on another
# core within a microsecond or two, few enough not to burn a time slice when both
# processes share one core.
_SPINS_BEFORE_YIELD = 2000


def _echo(name: str, max_bytes: int) -> None:  # pragma: no cover - runs in the child
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=name)
    try:
        buf = shm.buf
        assert buf is not None
        flags = buf[:16].cast("q")
        src = buf[64 : 64 + max_bytes]
        dst = bytearray(max_bytes)
        seen = 0
        while True:
            spins = 0
            while flags[0] == seen:
                spins += 1
                if spins > _SPINS_BEFORE_YIELD:
                    os.sched_yield()
            seen = flags[0]
            if seen < 0:
                break
            n = flags[1]
            dst[:n] = src[:n]  # the receive: one copy out of shared memory
            flags[1] = -seen  # acknowledge (a value the parent waits for)
        del flags, src, buf
    finally:
        shm.close()


def measure_shm_pingpong(
    sizes: Sequence[int] = (4096, 65536, 1 << 20, 4 << 20),
    *,
    repeats: int = 20,
    timeout_s: float = 20.0,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Best one-way time (us) of a shared-memory message per size between two processes.

    The parent copies ``n`` bytes into a segment and raises a flag; a child process
    copies them out and acknowledges. A one-way transfer is the round trip minus the
    acknowledgement, taken as half the round trip of an empty message (flags only): both
    copies stay on the path, as in a real transfer. The segment is unlinked and the child
    stopped whatever happens.
    """
    import multiprocessing as mp
    from multiprocessing import shared_memory

    if not sizes or min(sizes) <= 0:
        raise ValueError(f"sizes must be positive byte counts, got {list(sizes)}")
    max_bytes = max(sizes)
    shm = shared_memory.SharedMemory(create=True, size=64 + max_bytes)
    child = mp.get_context("fork").Process(target=_echo, args=(shm.name, max_bytes), daemon=True)
    payload = memoryview(bytes(range(256)) * (max_bytes // 256 + 1))
    buf = shm.buf
    assert buf is not None  # a segment just created is mapped
    flags = buf[:16].cast("q")
    data = buf[64 : 64 + max_bytes]
    out: list[float] = []
    try:
        flags[0] = 0
        flags[1] = 0
        child.start()
        seq = 0
        deadline = time.monotonic() + timeout_s
        for n in (0, *sizes):
            samples = []
            for _ in range(repeats + 2):  # two warm-up rounds
                seq += 1
                t0 = clock()
                data[:n] = payload[:n]
                flags[1] = n
                flags[0] = seq
                spins = 0
                while flags[1] != -seq:
                    spins += 1
                    if spins <= _SPINS_BEFORE_YIELD:
                        continue
                    os.sched_yield()  # both processes may share one core
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"shared-memory ping-pong got no answer within {timeout_s} s"
                        )
                samples.append((clock() - t0) * 1e6)
            # the fastest round: the transfer itself, without the preemptions a shared
            # machine adds (a median would count time slices lost to other processes)
            out.append(min(samples[2:]))
    finally:
        flags[0] = -1
        if child.pid is not None:
            child.join(timeout=5)
        if child.pid is not None and child.is_alive():
            child.kill()
            child.join()
        del flags, data, buf
        shm.close()
        shm.unlink()
    empty = out.pop(0)
    return [max(rt - empty / 2, 0.0) for rt in out]
