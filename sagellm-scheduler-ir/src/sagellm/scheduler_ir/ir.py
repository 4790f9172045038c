"""Lowering of scheduler output to the execution-plan IR, and its optimiser pass."""

from __future__ import annotations

from sagellm.core.types import (
    ExecutionPlan,
    IRGraph,
    IRNode,
    IRNodeKind,
    SchedulerOutput,
    SequenceChunk,
)

__all__ = ["IRBuilder", "IROptimizer", "IRValidationError"]

_COMPUTE = (IRNodeKind.PREFILL_CHUNK, IRNodeKind.DECODE_BATCH)


class IRValidationError(ValueError):
    """An IR graph is not a DAG in topological order (a dangling or forward input)."""


class IROptimizer:
    """Cleans a list of nodes: drops empty ones, merges adjacent nodes of one kind.

    Merging keeps chunk order, so the plan's compute chunks stay in scheduler order.
    Inputs of dropped or merged nodes are redirected to the surviving node.
    """

    def run(self, nodes: list[IRNode]) -> tuple[IRNode, ...]:
        alias: dict[int, int] = {}
        out: list[IRNode] = []
        for node in nodes:
            inputs = tuple(dict.fromkeys(alias.get(i, i) for i in node.inputs))
            empty = (
                (node.kind in _COMPUTE and not node.chunks)
                or (node.kind is IRNodeKind.KV_MIGRATE and not node.migrations)
                or (node.kind is IRNodeKind.KV_TRANSFER and not node.transfers)
            )
            if empty:
                # a dropped node forwards its own inputs to whoever depended on it
                alias[node.node_id] = inputs[0] if len(inputs) == 1 else -1
                continue
            inputs = tuple(i for i in inputs if i != -1)
            prev = out[-1] if out else None
            if (
                prev is not None
                and prev.kind is node.kind
                and node.kind in _COMPUTE
                and prev.device == node.device
            ):
                merged_inputs = tuple(
                    dict.fromkeys(i for i in prev.inputs + inputs if i != prev.node_id)
                )
                out[-1] = IRNode(
                    node_id=prev.node_id,
                    kind=prev.kind,
                    inputs=merged_inputs,
                    chunks=prev.chunks + node.chunks,
                    device=prev.device,
                    config=prev.config,
                )
                alias[node.node_id] = prev.node_id
                continue
            if inputs != node.inputs:
                node = IRNode(
                    node_id=node.node_id,
                    kind=node.kind,
                    inputs=inputs,
                    chunks=node.chunks,
                    migrations=node.migrations,
                    transfers=node.transfers,
                    device=node.device,
                    config=node.config,
                )
            out.append(node)
        self.validate(out)
        return tuple(out)

    @staticmethod
    def validate(nodes: list[IRNode] | tuple[IRNode, ...]) -> None:
        """Raise IRValidationError unless every input names an earlier node (so no cycle)."""
        seen: set[int] = set()
        for node in nodes:
            if node.node_id in seen:
                raise IRValidationError(f"node id {node.node_id} appears twice")
            for i in node.inputs:
                if i not in seen:
                    raise IRValidationError(
                        f"node {node.node_id} ({node.kind.value}) depends on node {i}, "
                        "which does not come before it: the graph has a cycle or a dangling input"
                    )
            seen.add(node.node_id)


class IRBuilder:
    """Lowers a :class:`SchedulerOutput` to an :class:`ExecutionPlan`.

    Node order: KV migrations, prefill chunks, the decode batch, sampling. Compute nodes
    depend on the migration node (blocks must be in place before attention reads them);
    the sample node depends on every compute node and lists the sampled request ids.
    """

    def __init__(self, optimizer: IROptimizer | None = None) -> None:
        self.optimizer = optimizer or IROptimizer()

    def build(self, output: SchedulerOutput) -> ExecutionPlan:
        nodes: list[IRNode] = []
        deps: tuple[int, ...] = ()
        if output.migrations:
            nodes.append(
                IRNode(node_id=0, kind=IRNodeKind.KV_MIGRATE, migrations=output.migrations)
            )
            deps = (0,)
        compute_ids: list[int] = []
        kind: IRNodeKind | None = None
        run: list[SequenceChunk] = []

        def flush() -> None:
            if kind is not None and run:
                nid = len(nodes)
                nodes.append(IRNode(node_id=nid, kind=kind, inputs=deps, chunks=tuple(run)))
                compute_ids.append(nid)

        sampled: list[str] = []
        for c in output.chunks:
            k = IRNodeKind.PREFILL_CHUNK if c.is_prefill else IRNodeKind.DECODE_BATCH
            if k is not kind:
                flush()
                kind, run = k, []
            run.append(
                SequenceChunk(
                    request_id=c.request_id,
                    token_ids=c.token_ids,
                    start_position=c.num_computed_tokens,
                    block_ids=c.block_ids,
                    sample=c.sample,
                    num_logits=1 + c.num_draft_tokens if c.sample else 1,
                )
            )
            if c.sample:
                sampled.append(c.request_id)
        flush()
        if sampled:
            nodes.append(
                IRNode(
                    node_id=len(nodes),
                    kind=IRNodeKind.SAMPLE,
                    inputs=tuple(compute_ids),
                    config={"request_ids": tuple(sampled)},
                )
            )
        return ExecutionPlan(
            plan_id=output.step_id,
            graph=IRGraph(nodes=self.optimizer.run(nodes)),
            request_ids=tuple(c.request_id for c in output.chunks),
        )
