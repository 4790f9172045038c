"""``python -m sagellm.engine.quant_eval``: accuracy of quantized models against float32.

Runs :func:`sagellm.quantization.eval.main` with models built by the native runtime
(``--model``, default the embedded SmolLM2-135M): perplexity, mean KL(P_ref || P_q),
top-1 agreement and the first greedy divergence on the text sagellm-quantization ships.
Example::

    python -m sagellm.engine.quant_eval gguf int4,group_size=64 gptq,group_size=64 awq,group_size=64

``--kernels NAME[,key=value...]`` picks the kernel provider of the quantized models (the
engine's default otherwise), e.g. ``gguf,dense_min_rows=16 --kernels
fused,int8_dense_linear=false`` to score the many-row steps in bfloat16 instead of W8A8.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["load_model", "main"]


def load_model(
    model: str,
    dtype: str,
    quantization: str,
    options: dict[str, Any],
    kernels: str | None = None,
) -> tuple[Callable[[Sequence[int]], Any], Callable[[str], list[int]]]:
    """``(run, tokenize)`` of ``model`` quantized by ``quantization`` with ``options``
    (``kernels``: the kernel provider spec, None for the engine's default)."""
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    rt = NativeRuntime(
        NativeRuntimeConfig(
            model=model,
            dtype=dtype,  # type: ignore[arg-type]
            quantization=quantization,
            quantization_options=options,
            kernels=kernels,
        )
    )
    return rt.run_sequence, rt.tokenize


def main(argv: Sequence[str] | None = None) -> int:
    """The evaluation's command line with the engine's models."""
    from sagellm.quantization.eval import main as eval_main

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--kernels", default=None)
    ours, rest = parser.parse_known_args(argv)

    def load(
        model: str, dtype: str, quantization: str, options: dict[str, Any]
    ) -> tuple[Callable[[Sequence[int]], Any], Callable[[str], list[int]]]:
        return load_model(model, dtype, quantization, options, ours.kernels)

    return eval_main(rest, load=load)


if __name__ == "__main__":
    sys.exit(main())
