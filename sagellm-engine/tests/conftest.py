"""Shared fixtures: a tiny random Llama on disk and engines built from it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sagellm.engine.llm import LLM

#: Options every test engine uses: small blocks so a few tokens span several blocks.
TINY_OPTIONS: dict[str, Any] = {
    "dtype": "float32",
    "block_size": 4,
    "num_threads": 1,
    "max_model_len": 256,
    "seed": 0,
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (safetensors + tokenizer with a chat template)."""
    from sagellm.engine.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


def make_llm(model: Path, **options: Any) -> LLM:
    """An LLM on ``model`` with the test defaults overridden by ``options``."""
    return LLM(model=str(model), **{**TINY_OPTIONS, **options})


@pytest.fixture(scope="session")
def tiny_llm(tiny_model: Path) -> LLM:
    """One engine shared by the tests that do not need special options."""
    return make_llm(tiny_model, num_blocks=512, max_num_seqs=64, max_num_batched_tokens=512)


def assert_no_leak(llm: LLM, timeout: float = 5.0) -> None:
    """Every KV block is free again (waits a little for asynchronous aborts)."""
    pool = llm.engine.kv_pool
    deadline = time.monotonic() + timeout
    while pool.num_free_blocks != pool.num_blocks and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not llm.engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks, (
        f"{pool.num_blocks - pool.num_free_blocks} KV blocks still in use"
    )


def slow_down(llm: LLM, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.01) -> None:
    """Make every step take a while, so a request outlives its client."""
    runtime = llm.engine.runtime
    real = runtime.execute

    def slow(plan: Any) -> Any:
        time.sleep(seconds)
        return real(plan)

    monkeypatch.setattr(runtime, "execute", slow)


def wait_idle(llm: LLM, timeout: float = 10.0) -> None:
    """Wait until the engine holds no request."""
    deadline = time.monotonic() + timeout
    while llm.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not llm.engine.has_unfinished_requests()


@pytest.fixture
def llm(tiny_llm: LLM) -> Any:
    """The shared engine; fails the test if it leaves a block allocated."""
    yield tiny_llm
    assert_no_leak(tiny_llm)
