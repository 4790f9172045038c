"""Cut one step's :class:`ExecutionPlan` into balanced micro-batches.

Anchor: SGLang's two-batch overlap splits a decode batch by sequences and an extend
(prefill) batch by tokens, so that each half carries about the same work; vLLM's
dual-batch overlap splits by tokens as well. Here the plan's compute chunks are laid on
one token line in graph order and cut into contiguous ranges: decode chunks (one token,
or one plus speculative drafts) are kept whole, prefill chunks may be cut at any token
that is not among the positions it samples. The cut points minimise the largest
micro-batch's estimated cost (an exact dynamic programme over the candidate cut points),
where a token at position ``p`` costs ``1 + attention_weight * (p + 1)`` (one unit for
the projections and MLP, plus attention over its context). Unlike SGLang, which splits
in two, any number of micro-batches is allowed.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from sagellm.core.types import ExecutionPlan, IRGraph, IRNode, IRNodeKind, SequenceChunk

__all__ = ["chunk_cost", "max_micro_batches", "split_plan"]

_COMPUTE = (IRNodeKind.PREFILL_CHUNK, IRNodeKind.DECODE_BATCH)


def chunk_cost(chunk: SequenceChunk, start: int, stop: int, attention_weight: float) -> float:
    """Estimated cost of tokens ``[start, stop)`` of ``chunk`` (see the module docstring)."""
    n = stop - start
    first = chunk.start_position + start + 1  # context length of the first token
    last = chunk.start_position + stop  # context length of the last token
    return n + attention_weight * (first + last) * n / 2


@dataclass(frozen=True, slots=True)
class _Unit:
    node_index: int  # index of the compute node in plan.graph.nodes
    chunk: SequenceChunk
    offset: int  # token-line position of the chunk's first token
    max_cut: int  # the chunk may be cut after token 1..max_cut of its own (0: kept whole)


def _units(plan: ExecutionPlan, split_prefill: bool) -> list[_Unit]:
    units: list[_Unit] = []
    offset = 0
    for i, node in enumerate(plan.graph.nodes):
        if node.kind not in _COMPUTE:
            continue
        for chunk in node.chunks:
            n = len(chunk.token_ids)
            if n == 0:
                continue
            max_cut = 0
            if split_prefill and node.kind is IRNodeKind.PREFILL_CHUNK:
                # the sampled positions stay together in the chunk's last piece
                keep = chunk.num_logits if chunk.sample else 1
                max_cut = max(0, n - keep)
            units.append(_Unit(i, chunk, offset, max_cut))
            offset += n
    return units


def max_micro_batches(plan: ExecutionPlan, split_prefill: bool = True) -> int:
    """The most non-empty micro-batches :func:`split_plan` can cut ``plan`` into."""
    return sum(1 + u.max_cut for u in _units(plan, split_prefill))


def _candidates(
    units: Sequence[_Unit], num_micro_batches: int, attention_weight: float
) -> tuple[list[int], list[float]]:
    """Token-line cut points worth considering, with the cumulative cost at each.

    Every chunk boundary, and inside each cuttable chunk the points nearest the ideal
    cost targets plus the first and last few cut points (so that many micro-batches
    still fit when the targets fall inside whole chunks).
    """
    total = sum(chunk_cost(u.chunk, 0, len(u.chunk.token_ids), attention_weight) for u in units)
    targets = [total * i / num_micro_batches for i in range(1, num_micro_batches)]
    points: dict[int, float] = {0: 0.0}
    before = 0.0
    for u in units:
        n = len(u.chunk.token_ids)
        after = before + chunk_cost(u.chunk, 0, n, attention_weight)
        if u.max_cut:
            ks = set(range(1, min(num_micro_batches, u.max_cut + 1)))
            ks.update(range(max(1, u.max_cut - num_micro_batches + 2), u.max_cut + 1))
            for t in targets:
                if before < t < after:
                    # the cost inside a chunk grows with k: bisect the cut nearest t
                    lo, hi = 1, u.max_cut
                    while lo < hi:
                        mid = (lo + hi) // 2
                        if before + chunk_cost(u.chunk, 0, mid, attention_weight) < t:
                            lo = mid + 1
                        else:
                            hi = mid
                    ks.update(k for k in (lo - 1, lo) if 1 <= k <= u.max_cut)
            for k in ks:
                points[u.offset + k] = before + chunk_cost(u.chunk, 0, k, attention_weight)
        points[u.offset + n] = after
        before = after
    cuts = sorted(points)
    return cuts, [points[c] for c in cuts]


def _best_cuts(costs: Sequence[float], num_micro_batches: int) -> list[int]:
    """Indexes into ``costs`` (cumulative) of the cut points that minimise the largest
    segment, near-ties broken by the smaller sum of squared segment costs.

    A dynamic programme over the number of segments; each step bisects for the cut
    where the best split of the prefix stops being smaller than the last segment, so it
    takes ``O(n * C log C)`` for ``C`` candidate points.
    """
    c = len(costs)
    inf = (float("inf"), float("inf"))
    # best[j] = (largest segment, sum of squares) of the best split of [0, j] so far
    best: list[tuple[float, float]] = [(costs[j], costs[j] ** 2) for j in range(c)]
    best[0] = inf
    back: list[list[int]] = []
    for k in range(2, num_micro_batches + 1):
        new: list[tuple[float, float]] = [inf] * c
        arg = [-1] * c
        ends = [c - 1] if k == num_micro_batches else range(k, c)
        for j in ends:
            # best[i][0] grows with i and the last segment shrinks: the optimum sits where
            # they cross (bisected); its neighbours settle ties on the sum of squares
            lo, hi = k - 1, j - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if best[mid][0] >= costs[j] - costs[mid]:
                    hi = mid
                else:
                    lo = mid + 1
            for i in range(max(k - 1, lo - 2), min(j, lo + 2)):
                if best[i] == inf:
                    continue
                seg = costs[j] - costs[i]
                key = (max(best[i][0], seg), best[i][1] + seg * seg)
                if key < new[j]:
                    new[j], arg[j] = key, i
        back.append(arg)
        best = new
    cuts = [c - 1]
    for arg in reversed(back):
        cuts.append(arg[cuts[-1]])
    cuts.reverse()
    return cuts  # the last one is the line's end; the first segment starts at index 0


def _piece(chunk: SequenceChunk, start: int, stop: int) -> SequenceChunk:
    n = len(chunk.token_ids)
    if start == 0 and stop == n:
        return chunk
    last = stop == n
    # a piece keeps the chunk's whole block table: it covers the piece's positions too
    return SequenceChunk(
        request_id=chunk.request_id,
        token_ids=chunk.token_ids[start:stop],
        start_position=chunk.start_position + start,
        block_ids=chunk.block_ids,
        sample=chunk.sample and last,
        num_logits=chunk.num_logits if last else 1,
    )


def split_plan(
    plan: ExecutionPlan,
    num_micro_batches: int,
    *,
    split_prefill: bool = True,
    attention_weight: float = 0.0,
) -> list[ExecutionPlan]:
    """``plan`` as ``num_micro_batches`` micro-batch plans (see the module docstring).

    Raises ValueError when ``num_micro_batches < 1`` or exceeds
    :func:`max_micro_batches`.
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    if num_micro_batches == 1:
        return [plan]
    units = _units(plan, split_prefill)
    limit = sum(1 + u.max_cut for u in units)
    if num_micro_batches > limit:
        whole = sum(1 for u in units if not u.max_cut)
        raise ValueError(
            f"plan {plan.plan_id} can be cut into at most {limit} non-empty micro-batches "
            f"({len(units)} sequence chunks, {whole} of them kept whole, "
            f"{sum(len(u.chunk.token_ids) for u in units)} tokens); "
            f"got num_micro_batches={num_micro_batches}"
        )
    points, costs = _candidates(units, num_micro_batches, attention_weight)
    bounds = [0] + [points[i] for i in _best_cuts(costs, num_micro_batches)]
    # pieces[m][node_index] = the chunks of that compute node in micro-batch m
    pieces: list[dict[int, list[SequenceChunk]]] = [{} for _ in range(num_micro_batches)]
    starts = [u.offset for u in units]
    for m in range(num_micro_batches):
        lo, hi = bounds[m], bounds[m + 1]
        j = bisect.bisect_right(starts, lo) - 1
        while j < len(units) and units[j].offset < hi:
            u = units[j]
            a = max(lo, u.offset) - u.offset
            b = min(hi, u.offset + len(u.chunk.token_ids)) - u.offset
            if a < b:
                pieces[m].setdefault(u.node_index, []).append(_piece(u.chunk, a, b))
            j += 1
    in_chunks = {u.chunk.request_id for u in units}
    loose_ids = tuple(r for r in plan.request_ids if r not in in_chunks)
    return [
        _micro_plan(plan, pieces[m], m, num_micro_batches, loose_ids if m == 0 else ())
        for m in range(num_micro_batches)
    ]


def _micro_plan(
    plan: ExecutionPlan,
    chunks: dict[int, list[SequenceChunk]],
    index: int,
    count: int,
    loose_ids: tuple[str, ...],
) -> ExecutionPlan:
    nodes: list[tuple[int, IRNode]] = []
    samples = any(c.sample for cs in chunks.values() for c in cs)
    for i, node in enumerate(plan.graph.nodes):
        if node.kind in _COMPUTE:
            keep = i in chunks
        elif node.kind is IRNodeKind.KV_MIGRATE:
            keep = index == 0  # migrations run before the forward pass
        elif node.kind is IRNodeKind.KV_TRANSFER:
            keep = index == count - 1  # transfers send what the whole step computed
        elif node.kind is IRNodeKind.SAMPLE:
            keep = samples
        else:
            keep = True
        if keep:
            nodes.append((i, node))
    present = {n.node_id for _, n in nodes}
    out: list[IRNode] = []
    for i, node in nodes:
        changes: dict[str, object] = {}
        if node.kind in _COMPUTE:
            changes["chunks"] = tuple(chunks[i])
        inputs = tuple(x for x in node.inputs if x in present)
        if inputs != node.inputs:
            changes["inputs"] = inputs
        out.append(dataclasses.replace(node, **changes) if changes else node)  # type: ignore[arg-type]
    request_ids: list[str] = []
    for node in out:
        if node.kind in _COMPUTE:
            for c in node.chunks:
                if c.request_id not in request_ids:
                    request_ids.append(c.request_id)
    return ExecutionPlan(
        plan_id=plan.plan_id,
        graph=IRGraph(nodes=tuple(out)),
        request_ids=tuple(request_ids) + loose_ids,
        target_instance_id=plan.target_instance_id,
    )
