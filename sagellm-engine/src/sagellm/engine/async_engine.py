"""Asynchronous engine: a background task steps the engine, callers stream outputs.

Every call that touches the :class:`LLMEngine` (adding, aborting, stepping, collecting
stats) runs in one dedicated worker thread, one at a time, so the engine needs no locks
and the event loop stays free while the forward pass runs. Each request has a queue the
loop fills after every step; :meth:`AsyncLLMEngine.generate` drains it. A caller that
stops iterating (a client disconnect cancels its task) has its request aborted before the
next step; an exception inside a step is delivered to every request in flight, whose
blocks are freed, so no caller waits forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from sagellm.core.config import EngineConfig
from sagellm.core.errors import InvalidRequestError, RequestAbortedError, SageLLMError
from sagellm.core.types import (
    CapabilityDescriptor,
    CompletionOutput,
    RequestOutput,
    SamplingParams,
)
from sagellm.engine.config import BuildOptions
from sagellm.engine.llm_engine import EngineRequestOutput, LLMEngine, Prompt

__all__ = ["AsyncLLMEngine", "EngineDeadError", "RequestStream"]

logger = logging.getLogger(__name__)

#: Seconds between two background polls of an idle engine that holds KV offers.
BACKGROUND_POLL_S = 0.05


class EngineDeadError(SageLLMError, RuntimeError):
    """The engine loop stopped; no request can be served until the engine is rebuilt."""


def _engine_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sagellm-engine")


class _Delta:
    """Turns cumulative outputs of one request into per-step deltas; prompt logprobs
    come once, in the first output that has them.

    A choice that has finished appears once more, in the delta that carries its
    ``finish_reason``, and never after: with ``n > 1`` the other choices' later deltas
    leave it out (as vLLM's per-choice streams do), so a consumer sees each choice end once.
    """

    def __init__(self) -> None:
        self._text: dict[int, int] = {}
        self._tokens: dict[int, int] = {}
        self._ended: set[int] = set()
        self._prompt_logprobs_sent = False

    def __call__(self, out: RequestOutput) -> RequestOutput:
        outputs = []
        for c in out.outputs:
            if c.index in self._ended:
                continue
            if c.finish_reason is not None:
                self._ended.add(c.index)
            t0 = self._text.get(c.index, 0)
            k0 = self._tokens.get(c.index, 0)
            self._text[c.index] = len(c.text)
            self._tokens[c.index] = len(c.token_ids)
            outputs.append(
                CompletionOutput(
                    index=c.index,
                    text=c.text[t0:],
                    token_ids=c.token_ids[k0:],
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    logprobs=None if c.logprobs is None else c.logprobs[k0:],
                    cumulative_logprob=c.cumulative_logprob,
                )
            )
        if isinstance(out, EngineRequestOutput) and out.prompt_logprobs is not None:
            if self._prompt_logprobs_sent:
                return dataclasses.replace(out, outputs=outputs, prompt_logprobs=None)
            self._prompt_logprobs_sent = True
        return dataclasses.replace(out, outputs=outputs)


class RequestStream:
    """Outputs of one request, in order; closing it early aborts the request."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        request_id: str,
        queue: asyncio.Queue[RequestOutput | BaseException],
        *,
        delta: bool = False,
    ) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self._delta = _Delta() if delta else None
        self._done = False

    @property
    def finished(self) -> bool:
        """True once the final output was delivered (or the request failed)."""
        return self._done

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:
            self.close()  # cancelled while waiting: the caller is gone
            raise
        if isinstance(item, BaseException):
            self._done = True  # the engine already dropped the request
            raise item
        if item.finished:
            self._done = True
            self._engine._streams.pop(self.request_id, None)
        return self._delta(item) if self._delta is not None else item

    def close(self) -> None:
        """Abort the request unless it finished; safe to call more than once."""
        if not self._done:
            self._done = True
            self._engine._abort_soon(self.request_id)


class AsyncLLMEngine:
    """Serves many concurrent callers from one engine loop.

    Usage::

        engine = AsyncLLMEngine.from_config(load_engine_config())
        async for out in engine.generate("Hello", SamplingParams(max_tokens=8), delta=True):
            print(out.outputs[0].text, end="", flush=True)
    """

    def __init__(
        self, engine: LLMEngine, *, executor: concurrent.futures.ThreadPoolExecutor | None = None
    ) -> None:
        self.engine = engine
        # the engine thread: every step, request and stats call runs there, serialised
        self._executor = executor or _engine_thread()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._pending_aborts: set[str] = set()
        # calls queued for the engine thread that have not started: the step loop yields
        # to them (requests, aborts, stats) between steps
        self._calls_waiting = 0
        self._lock = threading.Lock()  # guards the two above across the threads
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._dead: BaseException | None = None

    @classmethod
    def build(cls, make: Callable[[], LLMEngine]) -> AsyncLLMEngine:
        """Serve the engine ``make()`` returns, built in the thread that will step it.

        Prefer this to ``AsyncLLMEngine(engine)`` for an engine that computes on the CPU:
        OpenMP (libgomp) keeps one thread team per thread that ever ran a parallel
        region, and once teams of two threads hold more threads than there are cores,
        every team stops spinning between regions and sleeps instead. A model loaded (and
        its kernels tuned) in the main thread and then stepped in the engine thread so
        pays a wake-up per parallel region: batch-1 decode ran 2.4x slower that way here
        (63 against 150 tokens/s).
        """
        executor = _engine_thread()
        try:
            engine = executor.submit(make).result()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(engine, executor=executor)

    @classmethod
    def from_config(
        cls, config: EngineConfig | None = None, options: BuildOptions | None = None, **kwargs: Any
    ) -> AsyncLLMEngine:
        """Build an :class:`LLMEngine` from ``config`` (in the engine thread) and serve it."""
        return cls.build(lambda: LLMEngine.from_config(config, options, **kwargs))

    # ------------------------------------------------------------------ properties

    @property
    def model_name(self) -> str:
        """Name the model is served under."""
        return self.engine.model_name

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (None when built without one)."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output."""
        return self.engine.max_model_len

    @property
    def num_live_requests(self) -> int:
        """Requests with an open stream."""
        return len(self._streams)

    def capabilities(self) -> CapabilityDescriptor:
        """What the engine serves."""
        return self.engine.parts.capabilities

    def is_healthy(self) -> bool:
        """True while the loop runs (or has not been started yet) and has not died."""
        if self._dead is not None or self._closed:
            return False
        return self._task is None or not self._task.done()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the background loop on the running event loop (done lazily by generate)."""
        if self._task is not None and not self._task.done():
            return
        if self._closed:
            raise EngineDeadError("the engine was shut down")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = self._loop.create_task(self._run(), name="sagellm-engine-loop")

    async def shutdown(self) -> None:
        """Abort everything, stop the loop and the worker thread."""
        self._closed = True
        for q in list(self._streams.values()):
            q.put_nowait(EngineDeadError("the engine is shutting down"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        ids = list(self._streams) + list(self._pending_aborts)
        with contextlib.suppress(Exception):
            await self._call(self.engine.abort_request, ids)
        close = getattr(self.engine, "close", None)
        if callable(close):
            try:
                await self._call(close)
            except Exception:
                logger.exception("closing the engine failed")
        self._executor.shutdown(wait=False)

    async def run_in_engine(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` in the engine thread, serialised with the steps."""
        return await self._call(fn, *args)

    async def collect_stats(self) -> dict[str, object]:
        """Stats snapshots of the engine and every component, taken between steps."""
        result: dict[str, object] = await self.run_in_engine(self.engine.component_stats)
        return result

    # ------------------------------------------------------------------ requests

    async def add_request(
        self,
        prompt: Prompt,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        delta: bool = False,
        **request_kwargs: Any,
    ) -> RequestStream:
        """Queue a request; its outputs arrive through the returned stream.

        Raises (InvalidRequestError, ...) before anything is queued when the engine refuses
        the request. ``request_kwargs`` go to :meth:`LLMEngine.add_request`.
        """
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop died: {self._dead!r}")
        self.start()
        rid = request_id or f"cmpl-{uuid.uuid4().hex}"
        if rid in self._streams:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[rid] = queue  # before adding: no output can be missed
        try:
            await self._call(
                lambda: self.engine.add_request(rid, prompt, sampling, **request_kwargs)
            )
        except BaseException:
            self._streams.pop(rid, None)
            raise
        assert self._wakeup is not None
        self._wakeup.set()
        return RequestStream(self, rid, queue, delta=delta)

    async def generate(
        self,
        prompt: Prompt,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        delta: bool = False,
        **request_kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's state after every step that advanced it, until it finishes.

        With ``delta=True`` each output carries only the text, tokens and logprobs added
        since the previous one (``prompt_logprobs`` only in the first output that has
        them). Invalid requests raise before the first output. Leaving
        the loop early (or being cancelled) aborts the request.
        """
        stream = await self.add_request(prompt, sampling, request_id, delta=delta, **request_kwargs)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks before the next step; unknown ids are ignored."""
        q = self._streams.pop(request_id, None)
        if q is not None:
            q.put_nowait(RequestAbortedError(f"request {request_id!r} was aborted"))
        self._abort_soon(request_id)

    def _abort_soon(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        with self._lock:
            self._pending_aborts.add(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    # ------------------------------------------------------------------ the loop

    def _call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in the engine thread; the step loop yields to it."""
        with self._lock:
            self._calls_waiting += 1

        def run() -> Any:
            with self._lock:
                self._calls_waiting -= 1
            return fn(*args)

        return asyncio.get_running_loop().run_in_executor(self._executor, run)

    def _take_aborts(self) -> list[str]:
        with self._lock:
            aborts = list(self._pending_aborts)
            self._pending_aborts.clear()
        return aborts

    def _has_work(self) -> bool:
        return bool(self._pending_aborts) or self.engine.has_unfinished_requests()

    def _background(self) -> bool:
        check = getattr(self.engine, "has_background_work", None)
        return bool(check is not None and check())

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: hand one step's outputs to their streams."""
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _steps(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the engine thread: step while the engine holds work and no call waits,
        handing every step's outputs to the event loop as it ends.

        The engine thread so goes from one step to the next without a round trip through
        the event loop, whose handlers (formatting, network writes) run while the next
        step's kernels run without the GIL. Outputs are copies: a later step cannot change
        them under a handler. A failing step raises here, after the outputs of the steps
        before it were handed out (the event loop runs its callbacks in order).
        """
        while not self._closed and not self._calls_waiting:
            aborts = self._take_aborts()
            if aborts:
                self.engine.abort_request(aborts)
            if not self.engine.has_unfinished_requests():
                return
            outputs = self.engine.step()
            if outputs:
                loop.call_soon_threadsafe(self._dispatch, outputs)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        try:
            while not self._closed:
                if not self._has_work():
                    self._wakeup.clear()
                    if self._background():
                        # KV offers held for a decode instance: reap their leases while idle
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wakeup.wait(), BACKGROUND_POLL_S)
                        if not self._has_work():
                            await self._call(self.engine.poll_background)
                    else:
                        await self._wakeup.wait()
                    continue
                try:
                    await loop.run_in_executor(self._executor, self._steps, loop)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a failed step must not hang its callers
                    logger.exception("engine step failed; failing the requests in flight")
                    await asyncio.sleep(0)  # the outputs handed out before it go first
                    await self._fail_all(exc)
                    continue
                # Let handlers consume (and the server flush) before stepping again.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the loop itself broke: fail everyone, mark dead
            self._dead = exc
            for q in self._streams.values():
                q.put_nowait(EngineDeadError(f"the engine loop died: {exc!r}"))
            raise

    async def _fail_all(self, exc: Exception) -> None:
        ids = list(self._streams)
        for rid in ids:
            q = self._streams.pop(rid)
            q.put_nowait(exc)
        try:
            await self._call(
                self.engine.abort_request, ids + [r for r in self._take_aborts() if r not in ids]
            )
        except Exception:  # the engine is broken beyond aborting: stop serving
            logger.exception("aborting after a failed step failed too; the engine is dead")
            self._dead = exc
        # Requests the engine still holds without a stream (added while the step failed)
        # would never be read; requests queued since then keep their streams.
        leftover = [r for r in self.engine.live_request_ids() if r not in self._streams]
        if leftover:
            with contextlib.suppress(Exception):
                await self._call(self.engine.abort_request, leftover)
