"""A tensor-parallel MLP stack: the layer-like workload the overlap is measured on.

Anchor: the MLP half of a Megatron/vLLM tensor-parallel transformer layer (nano-vllm's
``ColumnParallelLinear`` then ``RowParallelLinear`` with an all-reduce in the latter's
forward). Each layer computes ``x + all_reduce(gelu(x @ up_shard) @ down_shard)``: the
up projection is split by columns and the down projection by rows over the ranks, so
each rank holds ``1 / world_size`` of the weights and one all-reduce per layer sums the
partial outputs. Attention and norms are left out: the point is one collective per
layer whose size is the activations', between two matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:
    from sagellm.core.protocols import OverlapScheduler

__all__ = ["TensorParallelMLP"]

State = tuple[torch.Tensor, torch.Tensor]  # (residual input, partial output) of a layer


class TensorParallelMLP:
    """``num_layers`` tensor-parallel MLP layers; this rank's shards of seeded weights.

    Every rank draws the same full weights from ``seed`` and keeps its slice, so the
    result does not depend on ``world_size`` beyond float rounding, and a
    ``world_size == 1`` instance is the unsharded reference (no collective).
    :meth:`compute` and :meth:`communicate` are the two callables an
    ``OverlapScheduler.run`` takes.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        ffn_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        group: Any = None,
    ) -> None:
        if num_layers < 1 or hidden_size < 1 or ffn_size < 1:
            raise ValueError(
                f"num_layers, hidden_size and ffn_size must be >= 1, got {num_layers}, "
                f"{hidden_size}, {ffn_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if ffn_size % world_size:
            raise ValueError(
                f"ffn_size={ffn_size} must be a multiple of world_size={world_size} "
                "(each rank holds an equal slice)"
            )
        self.num_layers, self.hidden_size, self.ffn_size = num_layers, hidden_size, ffn_size
        self.rank, self.world_size, self.group = rank, world_size, group
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        shard = ffn_size // world_size
        cols = slice(rank * shard, (rank + 1) * shard)
        self.up: list[torch.Tensor] = []
        self.down: list[torch.Tensor] = []
        for _ in range(num_layers):
            up = torch.randn(hidden_size, ffn_size, generator=gen) / math.sqrt(hidden_size)
            down = torch.randn(ffn_size, hidden_size, generator=gen) / math.sqrt(ffn_size)
            self.up.append(up[:, cols].contiguous().to(self.device, dtype))
            self.down.append(down[cols, :].contiguous().to(self.device, dtype))
        self._zeros: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def compute(self, layer: int, micro_batch: int, x: torch.Tensor) -> State:
        """Column- then row-parallel matmul of one layer: ``(x, partial output)``."""
        h = F.gelu(x @ self.up[layer])
        return x, h @ self.down[layer]

    def communicate(self, layer: int, micro_batch: int, state: State) -> Callable[[], torch.Tensor]:
        """Start the layer's all-reduce of the partial output (``async_op=True``);
        the waiter waits for it and adds the residual."""
        x, partial = state
        if self.world_size == 1:
            return lambda: x + partial
        work = dist.all_reduce(partial, group=self.group, async_op=True)
        assert work is not None

        def wait() -> torch.Tensor:
            work.wait()
            return x + partial

        return wait

    # -- stand-ins that take one side away, for measuring each side alone

    def compute_without_collective(
        self, layer: int, micro_batch: int, state: State
    ) -> Callable[[], torch.Tensor]:
        """:meth:`communicate` with the all-reduce left out (compute alone)."""
        x, partial = state
        return lambda: x + partial

    def collective_without_compute(self, layer: int, micro_batch: int, x: torch.Tensor) -> State:
        """:meth:`compute` with the matmuls left out: a zero partial output of the same
        shape (all-reducing zeros keeps it zero), so only the collective costs time."""
        key = (micro_batch, tuple(x.shape))
        if key not in self._zeros:
            self._zeros[key] = torch.zeros_like(x)
        return x, self._zeros[key]

    def forward(
        self, scheduler: OverlapScheduler, micro_batches: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """All layers over ``micro_batches`` (row blocks of the activations) in the
        scheduler's order."""
        return scheduler.run(micro_batches, self.num_layers, self.compute, self.communicate)
