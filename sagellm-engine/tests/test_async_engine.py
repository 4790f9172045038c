"""AsyncLLMEngine: streaming deltas, cancellation, failures that must not hang callers."""

from __future__ import annotations

import asyncio
import time

import pytest

from sagellm.core.errors import InvalidRequestError
from sagellm.core.types import FinishReason, SamplingParams
from sagellm.engine.async_engine import AsyncLLMEngine
from sagellm.engine.llm import LLM

from .conftest import assert_no_leak

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_deltas_add_up_to_the_offline_result(llm: LLM) -> None:
    (offline,) = llm.generate(["hello world"], GREEDY)

    async def main() -> tuple[str, list[int], int]:
        engine = AsyncLLMEngine(llm.engine)
        text, ids, n = "", [], 0
        async for out in engine.generate("hello world", GREEDY, delta=True):
            text += out.outputs[0].text
            ids += out.outputs[0].token_ids
            n += 1
        await engine.shutdown()
        return text, ids, n

    text, ids, n = run(main())
    assert ids == offline.outputs[0].token_ids
    assert text == offline.outputs[0].text
    assert n == 8  # one output per step


def test_concurrent_generators_each_get_their_own_stream(llm: LLM) -> None:
    prompts = [[5 + i, 6, 7] for i in range(8)]
    offline = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]

    async def main() -> list[list[int]]:
        engine = AsyncLLMEngine(llm.engine)

        async def one(p: list[int]) -> list[int]:
            last = None
            async for out in engine.generate(p, GREEDY):
                last = out
            assert last is not None and last.finished
            return last.outputs[0].token_ids

        result = await asyncio.gather(*(one(p) for p in prompts))
        await engine.shutdown()
        return list(result)

    assert run(main()) == offline


def test_cancelling_a_consumer_aborts_its_request(llm: LLM, monkeypatch) -> None:
    runtime = llm.engine.runtime
    real = runtime.execute

    def slow(plan):  # every step takes 10 ms: 200 tokens outlive the consumer
        time.sleep(0.01)
        return real(plan)

    monkeypatch.setattr(runtime, "execute", slow)
    llm.engine.make_stats()

    async def main() -> None:
        engine = AsyncLLMEngine(llm.engine)
        params = SamplingParams(max_tokens=200, ignore_eos=True)

        async def consume() -> None:
            async for _ in engine.generate([5, 6, 7], params, request_id="gone"):
                pass

        task = asyncio.create_task(consume())
        while not llm.engine.has_unfinished_requests():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if not llm.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        assert not llm.engine.has_unfinished_requests()
        await engine.shutdown()

    run(main())
    assert_no_leak(llm)
    stats = llm.engine.make_stats()
    assert stats.num_requests_aborted == 1 and stats.num_requests_finished == 0


def test_invalid_requests_raise_before_streaming(llm: LLM) -> None:
    async def main() -> None:
        engine = AsyncLLMEngine(llm.engine)
        with pytest.raises(InvalidRequestError, match="the prompt is empty"):
            async for _ in engine.generate([], GREEDY):
                pass
        assert engine.num_live_requests == 0
        await engine.shutdown()

    run(main())


def test_a_failing_step_fails_every_request_and_frees_blocks(llm: LLM, monkeypatch) -> None:
    runtime = llm.engine.runtime
    real_execute = runtime.execute
    calls = {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return real_execute(plan)

    monkeypatch.setattr(runtime, "execute", flaky)

    async def main() -> list[object]:
        engine = AsyncLLMEngine(llm.engine)

        async def one(p: list[int]) -> object:
            try:
                async for _ in engine.generate(p, SamplingParams(max_tokens=20, ignore_eos=True)):
                    pass
            except RuntimeError as exc:
                return str(exc)
            return "finished"

        results = await asyncio.gather(*(one([5 + i, 6]) for i in range(4)))
        # the engine keeps serving after the failure
        last = None
        async for out in engine.generate([9, 9], GREEDY):
            last = out
        assert last is not None and last.outputs[0].finish_reason is FinishReason.LENGTH
        assert engine.is_healthy()
        await engine.shutdown()
        return list(results)

    results = run(main())
    assert "simulated device failure" in results
    assert_no_leak(llm)


def test_build_makes_and_steps_the_engine_in_one_thread(llm: LLM) -> None:
    """AsyncLLMEngine.build runs the factory in the engine thread, the thread every step
    then runs in (one OpenMP team per process); a failing factory raises as it is."""
    import threading

    seen: dict[str, set[int]] = {"make": set(), "step": set()}
    inner = llm.engine
    real_step = inner.step

    def step(**kw):
        seen["step"].add(threading.get_ident())
        return real_step(**kw)

    def make():
        seen["make"].add(threading.get_ident())
        return inner

    inner.step = step  # type: ignore[method-assign]
    try:

        async def main() -> list[int]:
            engine = AsyncLLMEngine.build(make)
            last = None
            async for out in engine.generate([5, 6, 7], GREEDY):
                last = out
            await engine.shutdown()
            assert last is not None
            return list(last.outputs[0].token_ids)

        ids = run(main())
    finally:
        del inner.step
    assert len(ids) == 8
    assert len(seen["make"]) == 1 and seen["step"] == seen["make"]
    assert seen["make"] != {threading.get_ident()}

    def broken():
        raise InvalidRequestError("no model here")

    with pytest.raises(InvalidRequestError, match="no model here"):
        AsyncLLMEngine.build(broken)
