"""sagellm.collective_ops: collectives over torch.distributed, shared memory on one host.

Usage::

    from sagellm.collective_ops import CollectiveConfig, TorchCommBackend

    comm = TorchCommBackend(CollectiveConfig(), rank=rank, world_size=2,
                            init_method="tcp://127.0.0.1:29500")
    comm.all_reduce(x)                  # shm_flat / shm_direct / torch, from the cost table
    all_reduce_coalesced(comm, grads)   # small tensors fused into 25 MB buckets
    comm.close()

    run_ranks(2, fn)                    # fn(backend) on two local ranks, for tests and benches
"""

from sagellm.collective_ops._version import __version__
from sagellm.collective_ops.backend import TorchCommBackend
from sagellm.collective_ops.buckets import Bucketer, all_reduce_coalesced, assign_buckets
from sagellm.collective_ops.config import CollectiveConfig
from sagellm.collective_ops.launch import RankError, run_ranks
from sagellm.collective_ops.tuner import CostModel, Tuner, choose

__all__ = [
    "Bucketer",
    "CollectiveConfig",
    "CostModel",
    "RankError",
    "TorchCommBackend",
    "Tuner",
    "__version__",
    "all_reduce_coalesced",
    "assign_buckets",
    "choose",
    "run_ranks",
]
