"""Quality and speed of pruned models against the dense model, in one run.

For each sparsifier spec (``"wanda,sparsity=0.5"``, ``"structured,ffn_sparsity=0.3"``):

* quality, teacher-forced over the shipped text (calibration and held-out parts,
  separately): perplexity of both models, mean ``KL(P_dense || P_pruned)`` per token,
  top-1 agreement with the dense model, and next-token accuracy of each (the "top-1
  loss" is the dense accuracy minus the pruned one);
* speed against the dense model in the same process, interleaved (dense, pruned,
  dense, pruned, ...: prefills alternate each repeat, decode steps alternate one by
  one): a prefill of ``prefill_tokens`` and batch-1 decode steps, medians, reported as
  dense time / pruned time (above 1: the pruned model is faster);
* memory: bytes of the model's tensors, pruned over dense, and the fraction of the
  blocks' projection weights removed (zeros, or rows and columns gone).

The package cannot build a model (it must not import the engine): :func:`main`
takes ``load=``, which the engine supplies (``python -m sagellm.engine.sparsity_eval``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from sagellm.sparsity.calibration import Tokenize, shipped_text

__all__ = [
    "LoadedModel",
    "Loader",
    "QualityReport",
    "SpeedReport",
    "compare_speed",
    "evaluate_quality",
    "format_rows",
    "main",
    "mean_kl",
    "next_token_accuracy",
    "perplexity",
    "top1_agreement",
]

#: ``run(token_ids)`` -> float logits ``[len(token_ids), vocab]``.
Run = Callable[[Sequence[int]], torch.Tensor]

_ROWS = 64  # rows per float64 chunk (a 49k vocabulary: 25 MB each)


@dataclass
class LoadedModel:
    """What the engine hands the evaluation for one model."""

    run: Run  # logits of every position of one sequence
    tokenize: Tokenize
    prefill: Callable[[Sequence[int]], object]  # one forward over a prompt (timed here)
    # (prompt, steps) -> step(): prefills the prompt (not timed), then each step() call
    # decodes one more token greedily at batch 1, up to ``steps`` calls (timed here)
    start_decode: Callable[[Sequence[int], int], Callable[[], object]]
    weight_bytes: int  # bytes of the model's tensors
    pruned_fraction: float  # fraction of the blocks' projection weights removed
    description: str  # per-block shapes or "dense"


#: ``load(model, dtype, sparsity)`` -> the model; ``sparsity`` None is the dense model.
Loader = Callable[[str, str, "str | None"], LoadedModel]


def _check(ref: torch.Tensor, q: torch.Tensor) -> None:
    if ref.dim() != 2 or tuple(ref.shape) != tuple(q.shape):
        raise ValueError(
            f"logits must be two [positions, vocab] tensors of one shape, got "
            f"{list(ref.shape)} and {list(q.shape)}"
        )


def _kl_rows(ref: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(0, ref.shape[0], _ROWS):
        lr = torch.log_softmax(ref[i : i + _ROWS].double(), dim=-1)
        lq = torch.log_softmax(q[i : i + _ROWS].double(), dim=-1)
        out.append((lr.exp() * (lr - lq)).sum(dim=-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(0, logits.shape[0], _ROWS):
        lp = torch.log_softmax(logits[i : i + _ROWS].double(), dim=-1)
        out.append(-lp.gather(1, targets[i : i + _ROWS, None])[:, 0])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _targets(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[0] != len(token_ids):
        raise ValueError(
            f"logits of shape {list(logits.shape)} do not fit {len(token_ids)} token ids"
        )
    if len(token_ids) < 2:
        raise ValueError("scoring needs at least two tokens (one prediction)")
    return torch.tensor([int(t) for t in token_ids[1:]], dtype=torch.long)


def perplexity(logits: torch.Tensor, token_ids: Sequence[int]) -> float:
    """``exp(mean(-log p(token[i+1] | logits[i])))`` over positions ``0 .. n-2``."""
    return math.exp(float(_nll_rows(logits[:-1], _targets(logits, token_ids)).mean()))


def mean_kl(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean ``KL(softmax(ref) || softmax(q))`` over rows (nats)."""
    _check(ref_logits, q_logits)
    return float(_kl_rows(ref_logits, q_logits).mean())


def top1_agreement(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the same in both."""
    _check(ref_logits, q_logits)
    return float((ref_logits.argmax(dim=-1) == q_logits.argmax(dim=-1)).double().mean())


def next_token_accuracy(logits: torch.Tensor, token_ids: Sequence[int]) -> float:
    """Fraction of positions whose argmax is the true next token."""
    targets = _targets(logits, token_ids)
    return float((logits[:-1].argmax(dim=-1) == targets).double().mean())


@dataclass(frozen=True)
class QualityReport:
    """Quality of a pruned model on one text, every window together."""

    num_tokens: int  # scored positions
    ppl_dense: float
    ppl: float
    mean_kl: float  # mean KL(P_dense || P_pruned) per token, nats
    top1_agreement: float  # same top-1 token as the dense model
    accuracy_dense: float  # next-token accuracy of the dense model
    accuracy: float  # next-token accuracy of the pruned model


def evaluate_quality(
    dense: Run, pruned: Run, token_ids: Sequence[int], *, seq_len: int = 512
) -> QualityReport:
    """Teacher-force ``token_ids`` through both models in windows of ``seq_len``."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    ids = [int(t) for t in token_ids]
    nll_d, nll_p, kl, same, hit_d, hit_p = [], [], [], [], [], []
    for i in range(0, len(ids), seq_len):
        win = ids[i : i + seq_len]
        if len(win) < 2:
            continue
        with torch.no_grad():
            ref = dense(win).float()
            q = pruned(win).float()
        _check(ref, q)
        targets = _targets(ref, win)
        ref, q = ref[:-1], q[:-1]
        nll_d.append(_nll_rows(ref, targets))
        nll_p.append(_nll_rows(q, targets))
        kl.append(_kl_rows(ref, q))
        same.append(ref.argmax(dim=-1) == q.argmax(dim=-1))
        hit_d.append(ref.argmax(dim=-1) == targets)
        hit_p.append(q.argmax(dim=-1) == targets)
    if not kl:
        raise ValueError("nothing to score: the text has fewer than two tokens")
    return QualityReport(
        num_tokens=int(torch.cat(kl).numel()),
        ppl_dense=math.exp(float(torch.cat(nll_d).mean())),
        ppl=math.exp(float(torch.cat(nll_p).mean())),
        mean_kl=float(torch.cat(kl).mean()),
        top1_agreement=float(torch.cat(same).double().mean()),
        accuracy_dense=float(torch.cat(hit_d).double().mean()),
        accuracy=float(torch.cat(hit_p).double().mean()),
    )


@dataclass(frozen=True)
class SpeedReport:
    """Pruned against dense, medians of interleaved repeats (ratios: dense / pruned)."""

    prefill_tokens: int
    decode_steps: int
    repeats: int
    prefill_dense_s: float  # median seconds of one prefill
    prefill_s: float
    decode_dense_tok_s: float  # batch-1 decode tokens per second (median)
    decode_tok_s: float
    prefill_speedup: float  # prefill_dense_s / prefill_s
    decode_speedup: float  # decode_tok_s / decode_dense_tok_s


def compare_speed(
    dense: LoadedModel,
    pruned: LoadedModel,
    prompt: Sequence[int],
    *,
    decode_steps: int = 32,
    repeats: int = 5,
) -> SpeedReport:
    """Time both models on the same prompt and take medians.

    The two sides alternate at the finest grain there is, so that the load of a shared
    machine hits both alike: prefills alternate dense, pruned (then pruned, dense) each
    repeat; decode steps alternate one step of each, over ``repeats`` decodes of
    ``decode_steps`` tokens. A warm-up of each side runs first.
    """
    if repeats < 1 or decode_steps < 1:
        raise ValueError("repeats and decode_steps must be at least 1")
    sides = {"dense": dense, "pruned": pruned}
    for m in sides.values():  # warm-up: first calls allocate and pick kernels
        m.prefill(prompt)
        step = m.start_decode(prompt, 2)
        step()
        step()
    pre: dict[str, list[float]] = {"dense": [], "pruned": []}
    dec: dict[str, list[float]] = {"dense": [], "pruned": []}
    for r in range(repeats):
        order = ["dense", "pruned"] if r % 2 == 0 else ["pruned", "dense"]
        for side in order:
            t0 = time.perf_counter()
            sides[side].prefill(prompt)
            pre[side].append(time.perf_counter() - t0)
        steps = {side: sides[side].start_decode(prompt, decode_steps) for side in order}
        for i in range(decode_steps):
            for side in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                steps[side]()
                dec[side].append(time.perf_counter() - t0)
    p_d, p_p = statistics.median(pre["dense"]), statistics.median(pre["pruned"])
    d_d, d_p = statistics.median(dec["dense"]), statistics.median(dec["pruned"])
    return SpeedReport(
        prefill_tokens=len(prompt),
        decode_steps=decode_steps,
        repeats=repeats,
        prefill_dense_s=p_d,
        prefill_s=p_p,
        decode_dense_tok_s=1.0 / d_d,
        decode_tok_s=1.0 / d_p,
        prefill_speedup=p_d / p_p,
        decode_speedup=d_d / d_p,
    )


@dataclass(frozen=True)
class EvalRow:
    """Everything measured for one sparsifier spec."""

    spec: str
    description: str
    pruned_fraction: float
    memory_ratio: float  # weight bytes, pruned / dense
    quality: Mapping[str, QualityReport]  # by text part
    speed: SpeedReport | None


_HEADER = (
    f"{'sparsity':<40} {'pruned':>6} {'mem':>5} {'text':<11} {'PPL d':>7} {'PPL':>8} "
    f"{'KL':>7} {'top-1':>6} {'acc d':>6} {'acc':>6} {'prefill':>7} {'decode':>7}"
)


def format_rows(rows: Sequence[EvalRow]) -> str:
    """A table: one line per (spec, text part); speed ratios on the first line of a spec."""
    lines = [_HEADER]
    for row in rows:
        for i, (part, q) in enumerate(row.quality.items()):
            speed = ("", "")
            if i == 0 and row.speed is not None:
                speed = (f"{row.speed.prefill_speedup:.2f}x", f"{row.speed.decode_speedup:.2f}x")
            lines.append(
                f"{row.spec:<40} {row.pruned_fraction:>6.1%} {row.memory_ratio:>5.2f} "
                f"{part:<11} {q.ppl_dense:>7.2f} {q.ppl:>8.2f} {q.mean_kl:>7.4f} "
                f"{q.top1_agreement:>6.1%} {q.accuracy_dense:>6.1%} {q.accuracy:>6.1%} "
                f"{speed[0]:>7} {speed[1]:>7}"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sagellm.engine.sparsity_eval",
        description=(
            "Prune the model with each sparsifier, then report perplexity, KL, top-1 "
            "agreement and accuracy against the dense model on the package's text, and "
            "prefill/decode speed against the dense model measured interleaved in the "
            "same run."
        ),
    )
    p.add_argument(
        "sparsity",
        nargs="+",
        help='sparsifiers, each "METHOD[,key=value...]", e.g. magnitude,sparsity=0.5 '
        "wanda,pattern=2:4 sparsegpt,sparsity=0.5 structured,ffn_sparsity=0.3",
    )
    p.add_argument("--model", default="smollm2-135m", help="model for the loader")
    p.add_argument("--dtype", default="auto", help="compute dtype of both models")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per scored window")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per text at most")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["heldout"],
        choices=("calibration", "heldout"),
        help="text parts to score (default: the held-out part)",
    )
    p.add_argument("--prefill-tokens", type=int, default=256, help="prompt of the timings")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats")
    p.add_argument("--no-speed", action="store_true", help="skip the timings")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None, *, load: Loader | None = None) -> int:
    """The command line; ``load`` builds the models (the engine supplies it)."""
    args = _parser().parse_args(argv)
    if load is None:
        print(
            "python -m sagellm.sparsity.eval needs a model, which sagellm-sparsity cannot "
            "build (it does not depend on the engine); run python -m "
            "sagellm.engine.sparsity_eval, which calls sagellm.sparsity.eval.main(argv, "
            "load=...)",
            file=sys.stderr,
        )
        return 2
    dense = load(args.model, args.dtype, None)
    parts: dict[str, list[int]] = {}
    for part in args.parts:
        name: Literal["calibration", "heldout"] = part
        ids = [int(t) for t in dense.tokenize(shipped_text(name))]
        parts[part] = ids[: args.max_tokens] if args.max_tokens else ids
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def reference(win: Sequence[int]) -> torch.Tensor:
        key = tuple(win)
        if key not in cache:
            cache[key] = dense.run(win).float()
        return cache[key]

    text = [int(t) for t in dense.tokenize(shipped_text("heldout"))]
    prompt = (text * (1 + args.prefill_tokens // max(len(text), 1)))[: args.prefill_tokens]
    rows = []
    for spec in args.sparsity:
        pruned = load(args.model, args.dtype, spec)
        quality = {
            part: evaluate_quality(reference, pruned.run, ids, seq_len=args.seq_len)
            for part, ids in parts.items()
        }
        speed = None
        if not args.no_speed:
            speed = compare_speed(
                dense, pruned, prompt, decode_steps=args.decode_steps, repeats=args.repeats
            )
        rows.append(
            EvalRow(
                spec=spec,
                description=pruned.description,
                pruned_fraction=pruned.pruned_fraction,
                memory_ratio=pruned.weight_bytes / dense.weight_bytes,
                quality=quality,
                speed=speed,
            )
        )
        del pruned
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(
            f"model {args.model} ({args.dtype}); prefill {args.prefill_tokens} tokens, "
            f"{args.decode_steps} decode steps, medians of {args.repeats} interleaved "
            "repeats; speed is dense time / pruned time"
        )
        print(format_rows(rows))
        for r in rows:
            print(f"{r.spec}: {r.description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
