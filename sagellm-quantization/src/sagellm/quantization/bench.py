"""Side-by-side timings of the quantized kernels against bf16 ``F.linear`` (asv and CLI).

``python -m sagellm.quantization.bench`` prints, for the embedded model's projection
shapes (SmolLM2-135M: qkv 576 -> 960, o 576 -> 576, gate_up 576 -> 3072, down 1536 ->
576), the median time of each method and its ratio to bf16 ``F.linear`` measured in
the same process, calls interleaved (these machines are shared and noisy: ratios, not
absolute times, are comparable).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.nn import functional as F

from sagellm.quantization.formats import int4_rtn, int8_rtn, pack_int4
from sagellm.quantization.smoothquant import SmoothQuantMethod

__all__ = ["SHAPES", "Kernels", "interleaved", "main"]

#: (output rows, input columns) of the embedded model's projections.
SHAPES: dict[str, tuple[int, int]] = {
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
}


def interleaved(fns: dict[str, Callable[[], object]], *, repeat: int = 15) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved round by round."""
    for fn in fns.values():  # warm up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


class _Layer(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight: Any = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None
        self.input_size = weight.shape[1]


class Kernels:
    """One projection shape in bf16 and its int4 (g32), int8 and W8A8 forms."""

    def __init__(self, shape: str, seed: int = 0) -> None:
        n, k = SHAPES[shape]
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=gen) * k**-0.5
        self.k = k
        self.weight = w.bfloat16()
        self.qweight4, self.scale_zeros = pack_int4(*int4_rtn(w, 32), torch.bfloat16)
        q8, s8 = int8_rtn(w)
        self.qweight8, self.scales8 = q8, s8.bfloat16()
        self.w8a8 = _Layer(w.bfloat16())
        act_max = (torch.rand(k, generator=gen) + 0.5) * 4
        self.smooth = SmoothQuantMethod(
            act_max.pow(0.8) / w.abs().amax(0).pow(0.2), w8a8_min_rows=1
        )
        self.smooth.process_weights(self.w8a8)

    def inputs(self, rows: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(rows)
        return torch.randn(rows, self.k, generator=gen).bfloat16()

    def bf16(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def int4(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight4, 32, self.scale_zeros)

    def int8(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight8, self.scales8)

    def smoothquant(self, x: torch.Tensor) -> torch.Tensor:
        return self.smooth.apply(self.w8a8, x)


def main(argv: list[str] | None = None) -> int:
    """Print the kernel table (``--threads`` torch threads, ``--repeat`` rounds)."""
    p = argparse.ArgumentParser(prog="python -m sagellm.quantization.bench")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call (ratio)")
    print(f"{'shape':<8} {'rows':>5} {'bf16':>8} {'int4 g32':>16} {'int8':>16} {'w8a8':>16}")
    with torch.no_grad():
        for shape in SHAPES:
            k = Kernels(shape)
            for rows in args.rows:
                x = k.inputs(rows)
                t = interleaved(
                    {
                        "bf16": partial(k.bf16, x),
                        "int4": partial(k.int4, x),
                        "int8": partial(k.int8, x),
                        "w8a8": partial(k.smoothquant, x),
                    },
                    repeat=args.repeat,
                )
                base = t["bf16"]
                cells = [
                    f"{t[m] * 1e3:7.3f} ({t[m] / base:4.2f}x)" for m in ("int4", "int8", "w8a8")
                ]
                print(
                    f"{shape:<8} {rows:>5} {base * 1e3:8.3f} " + " ".join(f"{c:>16}" for c in cells)
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
