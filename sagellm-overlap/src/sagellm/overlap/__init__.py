"""sagellm.overlap: micro-batch overlap of collectives with compute (two-batch overlap).

Implements core's ``OverlapScheduler`` (entry-point group ``sagellm.overlap``): cut a
step's plan into balanced micro-batches, then run each layer's collective
asynchronously under another micro-batch's compute. Usage::

    from sagellm.overlap import MicroBatchOverlap, OverlapConfig, TensorParallelMLP

    scheduler = MicroBatchOverlap(OverlapConfig(mode="overlap"))
    parts = scheduler.split(plan, 2)                # two balanced ExecutionPlans
    # on each rank of an initialised torch.distributed group:
    mlp = TensorParallelMLP(4, 512, 2048, rank, world_size)
    outs = scheduler.run([x0, x1], mlp.num_layers, mlp.compute, mlp.communicate)

``python -m sagellm.overlap.bench`` measures compute alone, communication alone, the
serialised and the overlapped step on two gloo ranks and prints the hidden share.
"""

from sagellm.overlap._version import __version__
from sagellm.overlap.config import OverlapConfig
from sagellm.overlap.scheduler import MicroBatchOverlap, OverlapStats, hidden_under
from sagellm.overlap.split import chunk_cost, max_micro_batches, split_plan

__all__ = [
    "MicroBatchOverlap",
    "OverlapConfig",
    "OverlapStats",
    "TensorParallelMLP",
    "__version__",
    "chunk_cost",
    "hidden_under",
    "max_micro_batches",
    "split_plan",
]


def __getattr__(name: str) -> object:
    # the workload needs torch; the scheduler and split do not
    if name == "TensorParallelMLP":
        from sagellm.overlap.tp_mlp import TensorParallelMLP

        return TensorParallelMLP
    raise AttributeError(f"module 'sagellm.overlap' has no attribute {name!r}")
