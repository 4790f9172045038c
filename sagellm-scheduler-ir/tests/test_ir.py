from __future__ import annotations

import pytest

from sagellm.core.protocols import IRBuilder as IRBuilderProtocol
from sagellm.core.types import (
    IRNode,
    IRNodeKind,
    MigrationPlan,
    ScheduledChunk,
    SchedulerOutput,
    SequenceChunk,
)
from sagellm.scheduler_ir import IRBuilder, IROptimizer, IRValidationError
from sagellm.scheduler_ir.bench import main, measure


def chunk(
    rid: str, n: int, start: int = 0, sample: bool = True, prefill: bool = True
) -> ScheduledChunk:
    return ScheduledChunk(rid, tuple(range(n)), start, (0,), sample, prefill)


def test_builder_is_an_ir_builder():
    assert isinstance(IRBuilder(), IRBuilderProtocol)


def test_lowering_orders_migrate_compute_sample():
    mig = MigrationPlan("host", "device", (3,), (5,))
    out = SchedulerOutput(
        step_id=4,
        chunks=(
            chunk("a", 4, sample=False),
            chunk("b", 1, 9, prefill=False),
            chunk("c", 1, 5, prefill=False),
        ),
        num_scheduled_tokens=6,
        migrations=(mig,),
    )
    plan = IRBuilder().build(out)
    nodes = plan.graph.nodes
    assert [(n.node_id, n.kind, n.inputs) for n in nodes] == [
        (0, IRNodeKind.KV_MIGRATE, ()),
        (1, IRNodeKind.PREFILL_CHUNK, (0,)),
        (2, IRNodeKind.DECODE_BATCH, (0,)),
        (3, IRNodeKind.SAMPLE, (1, 2)),
    ]
    assert nodes[0].migrations == (mig,)
    assert nodes[3].config == {"request_ids": ("b", "c")}
    assert [c.request_id for c in plan.compute_chunks] == ["a", "b", "c"]
    assert plan.plan_id == 4 and plan.request_ids == ("a", "b", "c")


def test_empty_output_gives_an_empty_graph():
    assert IRBuilder().build(SchedulerOutput(1, (), 0)).graph.nodes == ()


def test_optimizer_merges_adjacent_nodes_and_drops_empty_ones():
    s = SequenceChunk("a", (1,), 0, (0,), True)
    t = SequenceChunk("b", (2,), 0, (1,), True)
    nodes = [
        IRNode(0, IRNodeKind.KV_MIGRATE),  # empty: dropped
        IRNode(1, IRNodeKind.DECODE_BATCH, inputs=(0,), chunks=(s,)),
        IRNode(2, IRNodeKind.DECODE_BATCH, inputs=(0,), chunks=(t,)),
        IRNode(3, IRNodeKind.SAMPLE, inputs=(1, 2)),
    ]
    out = IROptimizer().run(nodes)
    assert [(n.node_id, n.kind, n.inputs) for n in out] == [
        (1, IRNodeKind.DECODE_BATCH, ()),
        (3, IRNodeKind.SAMPLE, (1,)),
    ]
    assert out[0].chunks == (s, t)


def test_validation_rejects_cycles_and_dangling_inputs():
    with pytest.raises(IRValidationError, match=r"node 0 \(sample\) depends on node 1"):
        IROptimizer.validate(
            [IRNode(0, IRNodeKind.SAMPLE, inputs=(1,)), IRNode(1, IRNodeKind.SAMPLE, inputs=(0,))]
        )
    with pytest.raises(IRValidationError, match="node id 0 appears twice"):
        IROptimizer.validate([IRNode(0, IRNodeKind.SAMPLE), IRNode(0, IRNodeKind.SAMPLE)])


def test_bench_measures_both_schedulers(capsys):
    r = measure(num_requests=16, repeats=2)
    assert r["fcfs_decode_build_us"] > 0 and r["naive_decode_build_us"] > 0
    main(["--requests", "8", "--repeats", "2"])
    assert "decode   schedule" in capsys.readouterr().out
