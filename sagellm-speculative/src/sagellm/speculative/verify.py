"""Verification of drafts against the target's distributions (pure torch functions).

Anchor: the exact rule of Leviathan et al. (arXiv 2211.17192) and Chen et al. (arXiv
2302.01318), as in gpt-fast's ``speculative_decode`` and vLLM's ``RejectionSampler``:
draft ``x_j`` drawn from ``q_j`` is accepted with probability ``min(1, p_j(x_j) / q_j(x_j))``;
at the first rejection the token is drawn from ``norm(max(0, p_j - q_j))`` and the rest
is discarded; when every draft is accepted a bonus token is drawn from ``p_k``. Every
emitted token is then distributed exactly as the target would sample it alone. A
deterministic proposer (lookup, trees) is a point mass ``q_j = onehot(x_j)``: acceptance
is ``p_j(x_j)`` and the residual is ``p_j`` with ``x_j`` removed. Greedy verification is
the zero-temperature case: drafts are kept while they equal the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["greedy_accept", "num_accepted_greedy", "rejection_sample"]


def _check(rows: torch.Tensor, draft_token_ids: Sequence[int], what: str) -> None:
    k = len(draft_token_ids)
    if rows.dim() != 2 or rows.shape[0] != k + 1:
        raise ValueError(
            f"{what} of shape {tuple(rows.shape)} do not fit {k} drafts: give k + 1 = {k + 1} "
            "rows, one per draft position and one for the bonus token"
        )
    vocab = rows.shape[1]
    bad = [t for t in draft_token_ids if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"draft token {bad[0]} is outside the vocabulary [0, {vocab})")


def num_accepted_greedy(target_ids: Sequence[int], draft_token_ids: Sequence[int]) -> int:
    """How many leading drafts equal the target's greedy tokens at their positions."""
    n = 0
    for want, got in zip(target_ids, draft_token_ids):
        if int(want) != int(got):
            break
        n += 1
    return n


def greedy_accept(target_logits: torch.Tensor, draft_token_ids: Sequence[int]) -> list[int]:
    """Tokens emitted by greedy verification: the accepted drafts, then the target's own
    token at the first mismatch (or the bonus token after the last draft).

    ``target_logits`` is ``[k + 1, vocab]``: row ``j`` is the target's prediction after
    the context and the first ``j`` drafts. The result has 1 to k + 1 tokens and equals
    what k + 1 greedy steps without speculation would produce (up to the first mismatch).
    """
    _check(target_logits, draft_token_ids, "target logits")
    target = target_logits.argmax(dim=-1).tolist()
    n = num_accepted_greedy(target, draft_token_ids)
    return [int(t) for t in draft_token_ids[:n]] + [int(target[n])]


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: Sequence[int],
    draft_probs: torch.Tensor | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> list[int]:
    """Tokens emitted by exact speculative sampling (1 to k + 1 of them).

    ``target_probs`` ``[k + 1, vocab]`` holds the target's sampling distribution at each
    position (after temperature, top-k/top-p and penalties); ``draft_probs`` ``[k, vocab]``
    the distributions the drafts were drawn from, or None for deterministic drafts.
    ``generators[j]`` supplies the randomness of position ``j`` (None: torch's default),
    so a caller can make each emitted token reproducible from its request's seed.
    """
    _check(target_probs, draft_token_ids, "target probabilities")
    k = len(draft_token_ids)
    if draft_probs is not None and tuple(draft_probs.shape) != (k, target_probs.shape[1]):
        raise ValueError(
            f"draft probabilities of shape {tuple(draft_probs.shape)} do not fit {k} drafts "
            f"over a vocabulary of {target_probs.shape[1]}"
        )
    gens: Sequence[torch.Generator | None] = (
        list(generators) if generators is not None else [None] * (k + 1)
    )
    if len(gens) != k + 1:
        raise ValueError(f"give k + 1 = {k + 1} generators (one per position), got {len(gens)}")
    p_all = target_probs.float()
    out: list[int] = []
    for j, tok in enumerate(draft_token_ids):
        x = int(tok)
        p = p_all[j]
        q_x = 1.0 if draft_probs is None else float(draft_probs[j, x])
        p_x = float(p[x])
        u = float(torch.rand((), generator=gens[j]))
        if q_x > 0.0 and u * q_x < p_x:  # u < min(1, p/q) without dividing
            out.append(x)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[x] = 0.0
        else:
            residual = (p - draft_probs[j].float()).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: fall back to p
            residual = p
        out.append(int(torch.multinomial(residual, 1, generator=gens[j])))
        return out
    out.append(int(torch.multinomial(p_all[k], 1, generator=gens[k])))
    return out
