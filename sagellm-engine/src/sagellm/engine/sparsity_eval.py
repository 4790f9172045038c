"""``python -m sagellm.engine.sparsity_eval``: pruned models against the dense one.

Runs :func:`sagellm.sparsity.eval.main` with models built by the native runtime
(``--model``, default the embedded SmolLM2-135M, float weights on both sides):
perplexity, KL, top-1 agreement and accuracy on the text sagellm-sparsity ships, and
prefill and batch-1 decode speed against the dense model, interleaved in one process.
Both sides compute through the same kernel provider (``--kernels``, default eager
PyTorch: ``F.linear`` / ``torch.mv``, which any dense matrix, shrunk or not, runs on).
Example::

    python -m sagellm.engine.sparsity_eval magnitude,sparsity=0.5 wanda,pattern=2:4 \\
        sparsegpt,sparsity=0.5 structured,ffn_sparsity=0.3,head_sparsity=0.2

A spec may carry ``quantization=NAME`` (``structured,ffn_sparsity=0.3,quantization=int8``)
to quantize the pruned model afterwards (pruning composes with the quantizers); it is
still compared with the dense float model.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sagellm.core.types import SequenceChunk

__all__ = ["load_model", "main"]

_BLOCK = 16


def _start_decode(rt: Any, prompt: Sequence[int], steps: int) -> Callable[[], object]:
    """Prefill ``prompt`` on a scratch cache; a step() that decodes one token (greedy,
    batch 1, the engine's decode path) per call, ``steps`` calls at most."""
    from sagellm.engine.runtime.batch import build_step_batch

    mc = rt.model_config
    n = len(prompt) + steps
    num_blocks = math.ceil(n / _BLOCK)
    caches = [
        (
            torch.zeros(num_blocks, _BLOCK, mc.num_kv_heads, mc.head_dim, dtype=rt.dtype),
            torch.zeros(num_blocks, _BLOCK, mc.num_kv_heads, mc.head_dim, dtype=rt.dtype),
        )
        for _ in range(mc.num_layers)
    ]
    blocks = tuple(range(num_blocks))

    def forward(chunk: SequenceChunk, paged: bool) -> int:
        batch = build_step_batch(
            [chunk],
            block_size=_BLOCK,
            num_blocks=num_blocks,
            max_model_len=rt.max_model_len,
            mask_dtype=rt.dtype,
            device=rt.device,
            paged_decode=paged,
        )
        logits = rt.model(batch.token_ids, batch.positions, caches, batch.meta, batch.logit_rows)
        return int(logits[-1].argmax())

    state = {
        "token": forward(
            SequenceChunk("eval", tuple(int(t) for t in prompt), 0, blocks, True), False
        ),
        "position": len(prompt),
    }
    paged = bool(rt._has_decode_kernel)  # the engine's decode path on a float cache

    def step() -> object:
        if state["position"] >= n:
            raise ValueError(f"this decode was started for {steps} steps")
        chunk = SequenceChunk("eval", (state["token"],), state["position"], blocks, True)
        state["token"] = forward(chunk, paged)
        state["position"] += 1
        return state["token"]

    return step


def _tensor_bytes(module: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if t is not None:
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def load_model(model: str, dtype: str, sparsity: str | None, *, kernels: str = "eager") -> Any:
    """The :class:`sagellm.sparsity.eval.LoadedModel` of ``model`` pruned by ``sparsity``,
    computing through kernel provider ``kernels``."""
    from sagellm.engine.runtime.config import NativeRuntimeConfig, parse_spec
    from sagellm.engine.runtime.native import NativeRuntime
    from sagellm.sparsity.eval import LoadedModel

    quantization = "none"
    if sparsity is not None:
        name, options = parse_spec(sparsity)
        quantization = str(options.pop("quantization", "none"))
        sparsity = ",".join([name, *(f"{k}={v}" for k, v in options.items())])
    rt = NativeRuntime(
        NativeRuntimeConfig(
            model=model,
            dtype=dtype,  # type: ignore[arg-type]
            quantization=quantization,
            sparsity=sparsity,
            kernels=kernels,
        )
    )
    shapes = rt.block_shapes
    if shapes:
        widths = sorted({s.intermediate_size for s in shapes.values()})
        heads = sorted({s.num_heads for s in shapes.values()})
        description = (
            f"{len(shapes)} blocks shrunk; FFN widths {widths[0]}-{widths[-1]} of "
            f"{rt.model_config.intermediate_size}, query heads {heads[0]}-{heads[-1]} of "
            f"{rt.model_config.num_heads}"
        )
    else:
        description = "dense shapes" if sparsity else "dense"

    def prefill(ids: Sequence[int]) -> object:
        return rt.run_sequence(ids, last_only=True)

    return LoadedModel(
        run=rt.run_sequence,
        tokenize=rt.tokenize,
        prefill=prefill,
        start_decode=lambda prompt, steps: _start_decode(rt, prompt, steps),
        weight_bytes=_tensor_bytes(rt.model),
        pruned_fraction=rt.pruned_fraction,
        description=description + f" (quantization {rt.quantization})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The evaluation's command line with the engine's models; ``--kernels NAME`` (this
    module's own option, default eager) picks the kernel provider of both sides."""
    from sagellm.sparsity.eval import main as eval_main

    args = list(sys.argv[1:] if argv is None else argv)
    kernels = "eager"
    if "--kernels" in args:
        at = args.index("--kernels")
        if at + 1 >= len(args):
            print("--kernels needs a provider name (eager, fused, ...)", file=sys.stderr)
            return 2
        kernels = args[at + 1]
        del args[at : at + 2]

    def load(model: str, dtype: str, sparsity: str | None) -> Any:
        return load_model(model, dtype, sparsity, kernels=kernels)

    return eval_main(args, load=load)


if __name__ == "__main__":
    sys.exit(main())
