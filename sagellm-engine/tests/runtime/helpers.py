"""Plans built by hand and a dense reference model for the runtime tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sagellm.core.types import ExecutionPlan, IRGraph, IRNode, IRNodeKind, SequenceChunk


def make_plan(
    chunks: Sequence[SequenceChunk], *, decode: Sequence[SequenceChunk] = (), plan_id: int = 0
) -> ExecutionPlan:
    """A plan with one prefill node (``chunks``) and one decode node (``decode``)."""
    nodes = []
    if chunks:
        nodes.append(IRNode(0, IRNodeKind.PREFILL_CHUNK, chunks=tuple(chunks)))
    if decode:
        nodes.append(IRNode(1, IRNodeKind.DECODE_BATCH, chunks=tuple(decode)))
    rids = tuple(c.request_id for c in (*chunks, *decode))
    return ExecutionPlan(plan_id, IRGraph(tuple(nodes)), rids)


def chunk(
    rid: str, tokens: Sequence[int], start: int, blocks: Sequence[int], sample: bool = True
) -> SequenceChunk:
    return SequenceChunk(rid, tuple(tokens), start, tuple(blocks), sample)


def reference_logits(model_dir: Path, tokens: Sequence[int]) -> torch.Tensor:
    """Logits of every position from transformers' dense implementation (float32)."""
    from transformers import AutoModelForCausalLM

    ref = _REF.get(model_dir)
    if ref is None:
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        _REF[model_dir] = ref
    with torch.no_grad():
        return ref(torch.tensor([list(tokens)])).logits[0].float()


_REF: dict[Path, object] = {}


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()
