"""The package's C++ kernels, compiled on first use and cached on disk.

``torch.utils.cpp_extension.load`` builds ``csrc/*.cpp`` with the machine's compiler
(``-O3 -march=native``) into a cache folder keyed by the sources, the torch version and
the CPU's instruction-set flags, so only the first start on a machine compiles (about 30 s
on 2 cores) and a binary is never reused on a CPU it was not built for. The folder is
``$SAGELLM_KERNEL_CACHE`` or ``~/.cache/sagellm/kernels``. Without a working compiler the
kernels are unavailable: :func:`load_kernels` returns None after one log line, and
callers keep their eager paths.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

__all__ = ["cache_dir", "load_kernels"]

logger = logging.getLogger(__name__)

_SOURCES = (
    "paged_attention.cpp",
    "fused_ops.cpp",
    "gguf_linear.cpp",
    "prefill_attention.cpp",
    "decode_step.cpp",
    "int8_linear.cpp",
)
# -fopenmp: at::parallel_for is header code; without it every kernel runs on one thread
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    """Where compiled kernels are kept (``SAGELLM_KERNEL_CACHE`` or ~/.cache/sagellm/kernels)."""
    root = os.environ.get("SAGELLM_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "sagellm" / "kernels"


# A build that was killed leaves torch's lock file behind, and every later start would wait
# on it forever; a build takes well under this on any machine that builds at all.
_STALE_LOCK_SECONDS = 1800.0


def _clear_stale_lock(lock: Path) -> None:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > _STALE_LOCK_SECONDS:
        logger.warning("removing a stale kernel build lock %s (%.0f min old)", lock, age / 60)
        lock.unlink(missing_ok=True)


@functools.cache
def load_kernels() -> Any | None:
    """The compiled extension module, or None (logged once) when it cannot be built."""
    src = resources.files("sagellm.kernel_fusion") / "csrc"
    paths = [Path(str(src / name)) for name in _SOURCES]
    digest = hashlib.sha256()
    # the headers the sources include count too
    headers = sorted(Path(str(src)).glob("*.h"))
    for p in [*paths, *headers]:
        digest.update(p.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    digest.update(_cpu_flags().encode())
    tag = digest.hexdigest()[:16]
    build = cache_dir() / tag
    build.mkdir(parents=True, exist_ok=True)
    name = f"sagellm_kernels_{tag}"
    _clear_stale_lock(build / "lock")
    fresh = not any(build.glob(f"{name}*.so"))
    if fresh:
        logger.warning("compiling sageLLM's CPU kernels into %s (first start only)", build)
    t0 = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name=name,
            sources=[str(p) for p in paths],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=str(build),
            verbose=False,
        )
    except Exception as exc:  # no compiler, missing headers, a failed build
        logger.warning(
            "sageLLM's CPU kernels are unavailable (%s: %s); the eager paths are used",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return None
    if fresh:
        logger.warning("compiled sageLLM's CPU kernels in %.0f s", time.perf_counter() - t0)
    return module
