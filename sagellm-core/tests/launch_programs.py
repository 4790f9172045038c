"""Programs the launcher tests run on each rank (importable by name from the ranks)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from sagellm.core.testing.ranks import RankContext


def describe(ctx: RankContext, n: int) -> dict[str, Any]:
    """What the rank sees; the last rank reports first, so arrival order is not rank order."""
    time.sleep(0.1 * (ctx.world_size - 1 - ctx.rank))
    return {
        "value": ctx.rank * n,
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "device": ctx.device,
        "init_method": ctx.init_method,
        "pid": os.getpid(),
    }


def fail_on_rank_1(ctx: RankContext) -> str:
    """Rank 1 raises; rank 0 blocks until it is stopped."""
    if ctx.rank == 1:
        raise ValueError("rank 1 says no")
    time.sleep(600)
    return "not reached"


def hang_on_rank_1(ctx: RankContext, pid_folder: str) -> int:
    """Rank 1 never returns; both ranks leave their pid in ``pid_folder``."""
    Path(pid_folder, f"rank{ctx.rank}").write_text(str(os.getpid()))
    if ctx.rank == 1:
        time.sleep(600)
    return ctx.rank


def die_on_rank_1(ctx: RankContext) -> str:
    """Rank 1 ends without reporting, as a crash would; rank 0 returns a little later."""
    if ctx.rank == 1:
        os._exit(17)
    time.sleep(0.5)
    return "survived"


def unpicklable(ctx: RankContext) -> Any:
    return lambda: None


def ping_pong(ctx: RankContext) -> Any:
    """Rank 0 sends to rank 1, which answers; then rank 0 waits for a message never sent."""
    if ctx.rank == 0:
        ctx.send(1, "ping")
        answer = ctx.recv(30.0)
        try:
            ctx.recv(0.2)
        except TimeoutError as exc:
            return answer, str(exc)
        return answer, None
    got = ctx.recv(30.0)
    ctx.send(0, "pong")
    return got, None


def environment(ctx: RankContext) -> tuple[str | None, str | None]:
    return os.environ.get("SAGELLM_RANKS_ENV"), os.environ.get("SAGELLM_RANKS_PARENT")


def all_reduce(ctx: RankContext) -> tuple[str | None, float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t)
    return ctx.backend, float(t)


class FakeCommConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    folder: str
    tag: str = ""


class FakeComm:
    """Records how it was built; ``close`` leaves a file, so the parent sees it ran."""

    config_class = FakeCommConfig

    def __init__(
        self,
        config: FakeCommConfig,
        *,
        rank: int,
        world_size: int,
        init_method: str,
        backend: str | None = None,
    ) -> None:
        self.config, self.rank, self.world_size = config, rank, world_size
        self.init_method, self.backend = init_method, backend

    def close(self) -> None:
        Path(self.config.folder, f"closed{self.rank}").write_text("")


def describe_comm(comm: FakeComm, extra: int) -> dict[str, Any]:
    return {
        "rank": comm.rank,
        "world_size": comm.world_size,
        "tag": comm.config.tag,
        "backend": comm.backend,
        "file_store": comm.init_method.startswith("file://"),
        "extra": extra,
    }
