"""Offline accuracy of a quantized model against its float32 reference.

The metrics of llama.cpp's ``llama-perplexity --kl-divergence``, teacher-forced over the
text the package ships (its calibration part and its held-out part, separately):

* perplexity of each model on the text (``exp`` of the mean negative log-likelihood of
  each next token);
* mean ``KL(P_ref || P_q)`` per token (nats), with its 99th percentile and maximum;
  KL is the sensitive figure: perplexity averages per-token damage away;
* top-1 agreement: how often both models' most likely next token is the same;
* RMS of ``p_q - p_ref`` of the true next token (llama.cpp's "RMS Δp");
* the first greedy divergence: the first position at which the two top-1 tokens differ.

Position ``i`` of a sequence scores the prediction of token ``i + 1``; a text is cut into
independent windows of ``seq_len`` tokens, each run from an empty context.

The metric functions take logit tensors; :func:`main` (``python -m
sagellm.quantization.eval``) needs a model, which this package cannot build itself (it
must not import the engine): the engine passes ``load=``, see :data:`Loader`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from sagellm.quantization.calibration import Tokenize, shipped_text

__all__ = [
    "EvalReport",
    "Loader",
    "TokenScores",
    "evaluate",
    "first_divergence",
    "format_reports",
    "kl_per_token",
    "main",
    "mean_kl",
    "parse_spec",
    "perplexity",
    "summarize",
    "token_scores",
    "top1_agreement",
]

#: ``run(token_ids)`` -> float logits ``[len(token_ids), vocab]``.
Run = Callable[[Sequence[int]], torch.Tensor]

#: ``load(model, dtype, quantization, options)`` -> ``(run, tokenize)``: the model
#: ``model`` computing in ``dtype`` ("float32", "bfloat16") with its projections
#: quantized by the ``sagellm.quantization`` entry point ``quantization`` ("none": float)
#: built with ``options`` (and ``tokenize=`` for the calibrating ones).
Loader = Callable[[str, str, str, dict[str, Any]], tuple[Run, Tokenize]]

_ROWS = 64  # rows per float64 chunk (a 49k vocabulary: 25 MB each)


def _check(ref: torch.Tensor, q: torch.Tensor) -> None:
    if ref.dim() != 2 or tuple(ref.shape) != tuple(q.shape):
        raise ValueError(
            f"logits must be two [positions, vocab] tensors of one shape, got "
            f"{list(ref.shape)} and {list(q.shape)}"
        )


def kl_per_token(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(ref) || softmax(q))`` of each row, float64 ``[positions]`` (nats)."""
    _check(ref_logits, q_logits)
    out = []
    for i in range(0, ref_logits.shape[0], _ROWS):
        lr = torch.log_softmax(ref_logits[i : i + _ROWS].double(), dim=-1)
        lq = torch.log_softmax(q_logits[i : i + _ROWS].double(), dim=-1)
        out.append((lr.exp() * (lr - lq)).sum(dim=-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
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
    targets = _targets(logits, token_ids)
    return math.exp(float(_nll(logits[:-1], targets).mean()))


def mean_kl(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean of :func:`kl_per_token` over every row."""
    return float(kl_per_token(ref_logits, q_logits).mean())


def top1_agreement(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the same in both."""
    _check(ref_logits, q_logits)
    return float((ref_logits.argmax(dim=-1) == q_logits.argmax(dim=-1)).double().mean())


def first_divergence(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> int | None:
    """The first row whose argmax differs (the first greedy divergence); None if none."""
    _check(ref_logits, q_logits)
    differ = (ref_logits.argmax(dim=-1) != q_logits.argmax(dim=-1)).nonzero()
    return int(differ[0, 0]) if differ.numel() else None


@dataclass(frozen=True)
class TokenScores:
    """Per-position figures of one window (position ``i`` predicts token ``i + 1``)."""

    nll_ref: torch.Tensor  # float64 [n - 1]: -log p_ref(true next token)
    nll_q: torch.Tensor  # float64 [n - 1]: -log p_q(true next token)
    kl: torch.Tensor  # float64 [n - 1]: KL(P_ref || P_q)
    same_top1: torch.Tensor  # bool [n - 1]
    delta_p: torch.Tensor  # float64 [n - 1]: p_q - p_ref of the true next token


def token_scores(
    ref_logits: torch.Tensor, q_logits: torch.Tensor, token_ids: Sequence[int]
) -> TokenScores:
    """The per-position figures of one teacher-forced window."""
    _check(ref_logits, q_logits)
    targets = _targets(ref_logits, token_ids)
    ref, q = ref_logits[:-1], q_logits[:-1]
    nll_ref = _nll(ref, targets)
    nll_q = _nll(q, targets)
    return TokenScores(
        nll_ref=nll_ref,
        nll_q=nll_q,
        kl=kl_per_token(ref, q),
        same_top1=ref.argmax(dim=-1) == q.argmax(dim=-1),
        delta_p=torch.exp(-nll_q) - torch.exp(-nll_ref),
    )


@dataclass(frozen=True)
class EvalReport:
    """The figures of one model on one text (every window together)."""

    num_tokens: int  # scored positions
    ppl_ref: float  # perplexity of the reference
    ppl_q: float  # perplexity of the quantized model
    mean_kl: float  # mean KL(P_ref || P_q) per token, nats
    kl_p99: float  # 99th percentile of the per-token KL
    max_kl: float  # largest per-token KL
    top1_agreement: float  # fraction of positions with the same top-1 token
    rms_delta_p: float  # RMS of p_q - p_ref of the true next token
    first_divergence: int | None  # first position (over all windows, in order) whose
    # top-1 tokens differ; None: never


def summarize(windows: Sequence[TokenScores]) -> EvalReport:
    """One :class:`EvalReport` of several windows' scores, in their order."""
    if not windows:
        raise ValueError("nothing to summarize: no windows were scored")
    cat = {f: torch.cat([getattr(w, f) for w in windows]) for f in TokenScores.__dataclass_fields__}
    kl = cat["kl"]
    differ = (~cat["same_top1"]).nonzero()
    return EvalReport(
        num_tokens=int(kl.numel()),
        ppl_ref=math.exp(float(cat["nll_ref"].mean())),
        ppl_q=math.exp(float(cat["nll_q"].mean())),
        mean_kl=float(kl.mean()),
        kl_p99=float(torch.quantile(kl, 0.99)),
        max_kl=float(kl.max()),
        top1_agreement=float(cat["same_top1"].double().mean()),
        rms_delta_p=math.sqrt(float((cat["delta_p"] ** 2).mean())),
        first_divergence=int(differ[0, 0]) if differ.numel() else None,
    )


def evaluate(
    reference: Run,
    quantized: Run,
    token_ids: Sequence[int],
    *,
    seq_len: int = 512,
) -> EvalReport:
    """Teacher-force ``token_ids`` through both models in windows of ``seq_len`` tokens."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    windows = []
    ids = [int(t) for t in token_ids]
    for i in range(0, len(ids), seq_len):
        win = ids[i : i + seq_len]
        if len(win) < 2:
            continue
        with torch.no_grad():
            ref = reference(win).float()
            q = quantized(win).float()
        windows.append(token_scores(ref, q, win))
    return summarize(windows)


_HEADER = (
    f"{'quantization':<28} {'text':<11} {'tokens':>6} {'PPL ref':>8} {'PPL q':>8} "
    f"{'mean KL':>9} {'KL p99':>8} {'max KL':>7} {'top-1':>7} {'RMS dp':>7} {'1st div':>7}"
)


def format_reports(rows: Mapping[str, Mapping[str, EvalReport]]) -> str:
    """A table: one line per (quantization, text part)."""
    lines = [_HEADER]
    for name, parts in rows.items():
        for part, r in parts.items():
            div = "-" if r.first_divergence is None else str(r.first_divergence)
            lines.append(
                f"{name:<28} {part:<11} {r.num_tokens:>6} {r.ppl_ref:>8.3f} {r.ppl_q:>8.3f} "
                f"{r.mean_kl:>9.5f} {r.kl_p99:>8.4f} {r.max_kl:>7.3f} "
                f"{r.top1_agreement:>7.2%} {r.rms_delta_p:>7.4f} {div:>7}"
            )
    return "\n".join(lines)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"gptq,group_size=64,bits=3"`` -> ``("gptq", {"group_size": 64, "bits": 3})``.

    Values are read as JSON where they parse (numbers, true/false, null), else as text.
    """
    name, *pairs = spec.split(",")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"option {pair!r} of {spec!r} is not key=value")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    if not name:
        raise ValueError(f"{spec!r} names no quantization")
    return name, options


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sagellm.quantization.eval",
        description=(
            "Teacher-force the package's calibration and held-out text through a float32 "
            "reference and quantized models; print perplexity, KL, top-1 agreement and "
            "the first greedy divergence."
        ),
    )
    p.add_argument(
        "quantization",
        nargs="+",
        help='quantizers to compare, each "name[,key=value...]", e.g. int4,group_size=64 '
        "gptq,group_size=64 awq,group_size=64 (dense_min_rows=null unless given, so every "
        "row runs on the quantized kernel)",
    )
    p.add_argument("--model", default="smollm2-135m", help="model for the loader")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype of the quantized models (the reference is float32)",
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per text at most")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["calibration", "heldout"],
        choices=("calibration", "heldout"),
        help="text parts to score",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None, *, load: Loader | None = None) -> int:
    """The command line; ``load`` builds the models (the engine supplies it)."""
    args = _parser().parse_args(argv)
    if load is None:
        print(
            "python -m sagellm.quantization.eval needs a model, which sagellm-quantization "
            "cannot build (it does not depend on the engine); run the engine's command, "
            "which calls sagellm.quantization.eval.main(argv, load=...)",
            file=sys.stderr,
        )
        return 2
    specs = [parse_spec(s) for s in args.quantization]
    ref_run, tokenize = load(args.model, "float32", "none", {})
    parts: dict[str, list[int]] = {}
    for part in args.parts:
        name: Literal["calibration", "heldout"] = part
        ids = [int(t) for t in tokenize(shipped_text(name))]
        parts[part] = ids[: args.max_tokens] if args.max_tokens else ids
    # the reference logits once per window, shared by every quantizer
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def reference(win: Sequence[int]) -> torch.Tensor:
        key = tuple(win)
        if key not in cache:
            cache[key] = ref_run(win).float()
        return cache[key]

    results: dict[str, dict[str, EvalReport]] = {}
    for spec, (quant, options) in zip(args.quantization, specs):
        if quant != "none":
            options.setdefault("dense_min_rows", None)
        run, _ = load(args.model, args.dtype, quant, options)
        results[spec] = {
            part: evaluate(reference, run, ids, seq_len=args.seq_len) for part, ids in parts.items()
        }
        del run
    if args.json:
        out = {k: {p: asdict(r) for p, r in v.items()} for k, v in results.items()}
        print(json.dumps(out, indent=2))
    else:
        print(f"model {args.model}, quantized models in {args.dtype}, reference float32")
        print(format_reports(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
