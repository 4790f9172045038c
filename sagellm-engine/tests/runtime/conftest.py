"""Fixtures of the runtime tests: tiny checkpoints and runtimes bound to real pools."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm.engine.runtime.config import NativeRuntimeConfig
from sagellm.engine.runtime.native import NativeRuntime
from sagellm.engine.testing import make_tiny_llama


def bind_pool(rt: NativeRuntime, num_blocks: int = 64, block_size: int = 4, dtype=None):
    from sagellm.kv_pool.config import PagedKVPoolConfig
    from sagellm.kv_pool.paged import PagedKVPool

    pool = PagedKVPool(
        PagedKVPoolConfig(num_blocks=num_blocks), schema=rt.kv_cache_schema(block_size, dtype)
    )
    rt.bind_kv_pool(pool)
    return pool


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("rt-tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_rt(tiny_dir: Path) -> NativeRuntime:
    return NativeRuntime(NativeRuntimeConfig(model=str(tiny_dir), dtype="float32", num_threads=1))


@pytest.fixture
def rt(tiny_rt: NativeRuntime):
    """The shared fp32 tiny runtime bound to a fresh pool of 64 blocks of 4 tokens."""
    pool = bind_pool(tiny_rt)
    return tiny_rt, pool
