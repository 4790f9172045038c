"""Conformance suite of :class:`sagellm.core.protocols.CommBackend`.

A backend lives in several processes, so the suite does not build one: the subclass
provides :meth:`CommBackendConformance.run_ranks`, which runs a program in
``world_size`` processes with one backend each and returns what each rank returned.
The suite runs :func:`conformance_program` once per world size (every check in one
launch) and its tests assert on those results. Inputs are seeded per rank, so the
parent recomputes every rank's input and the exact reference. torch is imported only
inside functions.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

__all__ = ["CommBackendConformance", "conformance_program", "rank_input"]

#: (dtype name, element counts) of the all-reduce and all-gather checks.
CASES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("float32", (1, 7, 1000, 70_001)),
    ("float64", (513,)),
    ("bfloat16", (1000,)),
    ("int64", (1, 1000, 70_001)),
    ("int32", (4096,)),
)
OPS = ("sum", "max", "min", "product")


def rank_input(rank: int, n: int, dtype: str) -> Any:
    """The tensor rank ``rank`` contributes for ``n`` elements of ``dtype``."""
    import torch

    gen = torch.Generator().manual_seed(1000 * rank + n)
    if dtype.startswith("int"):
        return torch.randint(-50, 50, (n,), generator=gen, dtype=getattr(torch, dtype))
    # values in [0.5, 1.5): products of a few stay near 1, sums exact enough to compare
    x = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    return x.to(getattr(torch, dtype))


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # reported to the parent, which fails the right test
        return {"error": traceback.format_exc()}


def conformance_program(backend: Any, world_size: int) -> dict[str, Any]:
    """Every check, run on each rank; returns plain results for the parent to assert on."""
    import torch

    from sagellm.core.protocols import CommBackend

    rank = backend.rank
    out: dict[str, Any] = {
        "is_comm_backend": isinstance(backend, CommBackend),
        "rank": rank,
        "world_size": backend.world_size,
    }
    reduced: dict[str, Any] = {}
    for dtype, sizes in CASES:
        for n in sizes:
            for op in OPS:
                if op == "product" and n > 1000:
                    continue

                def one(dtype: str = dtype, n: int = n, op: str = op) -> Any:
                    t = rank_input(rank, n, dtype)
                    backend.all_reduce(t, op)
                    return t

                reduced[f"{dtype}/{n}/{op}"] = _guard(one)
    out["all_reduce"] = reduced
    gathered: dict[str, Any] = {}
    for dtype, sizes in CASES:
        for n in sizes:

            def gather(dtype: str = dtype, n: int = n) -> Any:
                t = rank_input(rank, n, dtype)
                o = torch.empty(world_size * n, dtype=t.dtype)
                backend.all_gather(o, t)
                return o

            gathered[f"{dtype}/{n}"] = _guard(gather)
    out["all_gather"] = gathered

    def ring() -> Any:
        # rank r sends to r+1 and receives from r-1; even ranks send first
        t = rank_input(rank, 333, "float32")
        got = torch.empty_like(t)
        nxt, prev = (rank + 1) % world_size, (rank - 1) % world_size
        if rank % 2 == 0:
            backend.send(t, nxt)
            backend.recv(got, prev)
        else:
            backend.recv(got, prev)
            backend.send(t, nxt)
        return got

    out["ring"] = _guard(ring)

    def bad_op() -> Any:
        try:
            backend.all_reduce(torch.ones(4), "average_of_medians")
        except ValueError as exc:
            return str(exc)
        return None

    def bad_gather() -> Any:
        try:
            backend.all_gather(torch.empty(world_size * 4 + 1), torch.ones(4))
        except ValueError as exc:
            return str(exc)
        return None

    out["bad_op"] = _guard(bad_op)
    out["bad_gather"] = _guard(bad_gather)

    def in_order() -> Any:
        # after the barrier, everything every rank wrote before it is there
        t = torch.full((8,), float(rank + 1))
        backend.barrier()
        backend.all_reduce(t, "sum")
        return t

    out["after_barrier"] = _guard(in_order)
    return out


def _reference(dtype: str, n: int, op: str, world_size: int) -> Any:
    import torch

    xs = [rank_input(r, n, dtype) for r in range(world_size)]
    wide = torch.float64 if not dtype.startswith("int") else torch.int64
    acc = xs[0].to(wide)
    for x in xs[1:]:
        x = x.to(wide)
        acc = {
            "sum": acc + x,
            "max": torch.maximum(acc, x),
            "min": torch.minimum(acc, x),
            "product": acc * x,
        }[op]
    return acc


def _tolerance(dtype: str, world_size: int) -> float:
    return {"float32": 1e-6, "float64": 1e-12, "bfloat16": 1e-2}.get(dtype, 0.0) * world_size


class CommBackendConformance:
    """Behaviour every communication backend shares. Implement :meth:`run_ranks`.

    ``world_sizes`` are the process counts checked (each costs one launch).
    """

    world_sizes: ClassVar[tuple[int, ...]] = (2,)
    _results_cache: ClassVar[dict[tuple[type, int], list[dict[str, Any]]]] = {}

    def run_ranks(self, world_size: int, program: Callable[[Any, int], Any]) -> list[Any]:
        """Run ``program(backend, world_size)`` in ``world_size`` processes, one backend
        each (closed afterwards); return the results in rank order (override this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement run_ranks()")

    def _results(self, world_size: int) -> list[dict[str, Any]]:
        key = (type(self), world_size)
        if key not in self._results_cache:
            self._results_cache[key] = self.run_ranks(world_size, conformance_program)
        return self._results_cache[key]

    def _each(self) -> list[tuple[int, list[dict[str, Any]]]]:
        return [(w, self._results(w)) for w in self.world_sizes]

    def test_ranks_and_protocol(self) -> None:
        for w, results in self._each():
            assert len(results) == w
            assert [r["rank"] for r in results] == list(range(w))
            assert all(r["world_size"] == w for r in results)
            assert all(r["is_comm_backend"] for r in results)

    def test_all_reduce_matches_reference(self) -> None:
        torch = pytest.importorskip("torch")
        for w, results in self._each():
            for key, got in results[0]["all_reduce"].items():
                assert not isinstance(got, dict), f"world {w} {key}: {got['error']}"
                dtype, n, op = key.split("/")
                ref = _reference(dtype, int(n), op, w)
                assert got.dtype == getattr(torch, dtype) and got.shape == (int(n),), key
                tol = _tolerance(dtype, w) * (2 if op == "product" else 1)
                if tol == 0.0:
                    assert torch.equal(got.to(ref.dtype), ref), f"world {w} {key}"
                else:
                    err = ((got.to(torch.float64) - ref).abs() / ref.abs().clamp_min(1)).max()
                    assert float(err) <= tol, f"world {w} {key}: relative error {float(err)}"

    def test_all_reduce_identical_on_every_rank(self) -> None:
        torch = pytest.importorskip("torch")
        for w, results in self._each():
            for key, first in results[0]["all_reduce"].items():
                for r in range(1, w):
                    other = results[r]["all_reduce"][key]
                    assert not isinstance(other, dict), f"rank {r} {key}: {other['error']}"
                    assert torch.equal(first, other), (
                        f"world {w} {key}: rank {r} differs from rank 0"
                    )

    def test_all_gather(self) -> None:
        torch = pytest.importorskip("torch")
        for w, results in self._each():
            for r, result in enumerate(results):
                for key, got in result["all_gather"].items():
                    assert not isinstance(got, dict), f"rank {r} {key}: {got['error']}"
                    dtype, n = key.split("/")
                    expected = torch.cat([rank_input(q, int(n), dtype) for q in range(w)])
                    assert torch.equal(got, expected), f"world {w} rank {r} {key}"

    def test_send_recv_ring(self) -> None:
        torch = pytest.importorskip("torch")
        for w, results in self._each():
            for r, result in enumerate(results):
                got = result["ring"]
                assert not isinstance(got, dict), f"rank {r}: {got['error']}"
                assert torch.equal(got, rank_input((r - 1) % w, 333, "float32"))

    def test_barrier_then_collective(self) -> None:
        torch = pytest.importorskip("torch")
        for w, results in self._each():
            total = float(sum(range(1, w + 1)))
            for r, result in enumerate(results):
                got = result["after_barrier"]
                assert not isinstance(got, dict), f"rank {r}: {got['error']}"
                assert torch.equal(got, torch.full((8,), total))

    def test_bad_input_raises_value_error(self) -> None:
        for _, results in self._each():
            for result in results:
                assert isinstance(result["bad_op"], str), "an unknown op must raise ValueError"
                for op in OPS:
                    assert op in result["bad_op"], f"the error should list {op!r}"
                assert isinstance(result["bad_gather"], str), (
                    "an all_gather output of the wrong size must raise ValueError"
                )
