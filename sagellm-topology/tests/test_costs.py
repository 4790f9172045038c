"""Alpha-beta priors, the least-squares fit and the shared-memory micro-benchmark."""

from __future__ import annotations

import glob
import multiprocessing as mp

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagellm.topology.costs import (
    LinkCost,
    fit_alpha_beta,
    inter_socket_gbps,
    measure_shm_pingpong,
    pcie_gbps,
)
from sagellm.topology.detector import calibrate_shm


def test_pcie_priors_are_nccls() -> None:
    assert pcie_gbps(8.0, 16) == 12.0  # topo.h PCI_BW, Gen3 x16
    assert pcie_gbps(16.0, 16) == 24.0
    assert pcie_gbps(32.0, 16) == 48.0
    assert pcie_gbps(2.5, 1) == 15 / 80
    assert pcie_gbps(None, 16) == 12.0  # sysfs gives no speed: NCCL's default
    assert pcie_gbps(8.0, None) == 12.0


def test_inter_socket_priors() -> None:
    assert inter_socket_gbps("GenuineIntel") == 10.0
    assert inter_socket_gbps("AuthenticAMD") == 16.0
    assert inter_socket_gbps("CentaurHauls") == 9.0
    assert inter_socket_gbps("") == 10.0


def test_link_cost_time() -> None:
    cost = LinkCost(alpha_us=5.7, beta_gbps=12.0)
    assert cost.time_us(0) == 5.7
    assert cost.time_us(12_000) == pytest.approx(6.7)
    with pytest.raises(ValueError, match="nbytes must be >= 0, got -1"):
        cost.time_us(-1)


@given(
    st.floats(0.0, 100.0),
    st.floats(0.1, 500.0),
    st.lists(st.integers(1, 1 << 26), min_size=2, max_size=8, unique=True),
)
def test_fit_recovers_noiseless_parameters(alpha: float, beta: float, sizes: list[int]) -> None:
    times = [alpha + n / (beta * 1e3) for n in sizes]
    fit = fit_alpha_beta(sizes, times)
    assert fit.beta_gbps == pytest.approx(beta, rel=1e-6)
    assert fit.alpha_us == pytest.approx(alpha, abs=1e-6 * max(times))


def test_fit_refuses_bad_points() -> None:
    with pytest.raises(ValueError, match="at least two distinct message sizes"):
        fit_alpha_beta([64, 64], [1.0, 2.0])
    with pytest.raises(ValueError, match="times do not grow with size"):
        fit_alpha_beta([64, 128], [2.0, 1.0])
    with pytest.raises(ValueError, match="2 sizes but 1 times"):
        fit_alpha_beta([64, 128], [1.0])


def _segments() -> set[str]:
    return set(glob.glob("/dev/shm/psm_*"))


def test_pingpong_measures_and_cleans_up() -> None:
    before = _segments()
    times = measure_shm_pingpong((4096, 8 << 20), repeats=5, timeout_s=30)
    assert len(times) == 2 and all(t >= 0 for t in times)
    assert times[1] > times[0]  # 8 MiB (two copies of it) costs more than 4 KiB
    assert _segments() == before
    assert mp.active_children() == []


def test_pingpong_refuses_empty_sizes() -> None:
    with pytest.raises(ValueError, match="sizes must be positive byte counts"):
        measure_shm_pingpong((0, 64))


def test_calibration_gives_a_usable_cost() -> None:
    cost = calibrate_shm(sizes=(4096, 65536, 1 << 20), repeats=5)
    assert cost.beta_gbps > 0.05  # even a loaded 2-core machine copies faster
    assert cost.alpha_us >= 0
