"""OpenAI-compatible HTTP API over an :class:`AsyncLLMEngine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE streaming),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /version``.
Every error is returned in OpenAI's schema ``{"error": {"message", "type", "param",
"code"}}``: 400 for invalid requests (including what FastAPI would report as 422), 404
for an unknown model or route, 503 when the engine cannot take more, 500 for internal
failures (logged, never described to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sagellm.core.errors import InvalidRequestError, RequestAbortedError, SageLLMError
from sagellm.core.types import CompletionOutput, FinishReason, RequestKind, RequestOutput
from sagellm.engine._version import __version__
from sagellm.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from sagellm.engine.config import ServerConfig
from sagellm.engine.llm import apply_chat_template
from sagellm.engine.metrics import PrometheusPublisher
from sagellm.engine.server.protocol import ChatCompletionRequest, CompletionRequest

__all__ = ["APIError", "build_app"]

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered in OpenAI's schema."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _internal_error() -> APIError:
    return APIError(
        500, "the server had an error while processing the request", type="internal_server_error"
    )


def _from_validation(exc: ValidationError | RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # pydantic puts the union member that failed into the location; keep the field path.
    loc = [p for p in loc if p not in ("str", "int", "float", "bool") and "[" not in p]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    message = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param)


def _finish_reason(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    if reason is FinishReason.ABORT:
        return "abort"
    return reason.value


class _Server:
    """The route handlers and what they share."""

    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model_name = config.served_model_name or engine.model_name
        aliases = {self.model_name, engine.model_name, engine.engine.config.model}
        self.accepted_models = {a for a in aliases if a}
        self.publisher = PrometheusPublisher(self.model_name)
        self.created = int(time.time())

    # ------------------------------------------------------------------ helpers

    def check_model(self, model: str) -> None:
        if model not in self.accepted_models and model.lower() not in {
            a.lower() for a in self.accepted_models
        }:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def body(self, request: Request, model: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _from_validation(exc) from None

    def tokenize(self, prompt: str | list[int], *, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            tok = self.engine.tokenizer
            if tok is None:
                raise APIError(400, "this server has no tokenizer: send token ids", param="prompt")
            ids: list[int] = tok.encode(prompt, add_special_tokens=add_special_tokens)
            return ids
        return list(prompt)

    def resolve_max_tokens(self, prompt_len: int, requested: int | None, param: str) -> int:
        limit = self.engine.max_model_len
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param=param)
        if prompt_len >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{'messages' if param == 'messages' else 'prompt'} resulted in {prompt_len} "
                "tokens. Please reduce the length of the input.",
                param=param,
                code="context_length_exceeded",
            )
        if requested is None:
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the input, {requested} for "
                "the completion). Please reduce the length of the input or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def token_text(self, token_id: int) -> str:
        tok = self.engine.tokenizer
        if tok is None:
            return f"token_id:{token_id}"
        text: str = tok.decode([token_id], skip_special_tokens=False)
        return text

    async def open_streams(
        self,
        prompts: Sequence[list[int]],
        sampling: Any,
        base_id: str,
        *,
        kind: RequestKind,
        priority: int,
        stream: bool,
    ) -> list[RequestStream]:
        if self.engine.num_live_requests + len(prompts) > self.config.max_concurrent_requests:
            raise APIError(
                503,
                "the server is at its request limit; retry later",
                type="server_error",
                code="overloaded",
            )
        streams: list[RequestStream] = []
        try:
            for i, ids in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(
                    await self.engine.add_request(
                        ids, sampling, rid, delta=stream, kind=kind, priority=priority
                    )
                )
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    async def collect(self, request: Request, streams: list[RequestStream]) -> list[RequestOutput]:
        """Final outputs of every stream; a client disconnect aborts them all."""

        async def last(stream: RequestStream) -> RequestOutput:
            final = None
            async for out in stream:
                final = out
            assert final is not None
            return final

        work: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(*(last(s) for s in streams))
        )
        watch: asyncio.Future[Any] = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
                raise RequestAbortedError("the client disconnected")
            return work.result()
        finally:
            watch.cancel()
            for s in streams:
                s.close()

    # ------------------------------------------------------------------ completions

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await self.body(request, CompletionRequest)
        self.check_model(req.model)
        prompts = [self.tokenize(p, add_special_tokens=True) for p in req.prompts()]
        max_tokens = [self.resolve_max_tokens(len(p), req.max_tokens, "prompt") for p in prompts]
        # One max_tokens for all prompts keeps one SamplingParams; take the tightest.
        sampling = self._sampling(req, min(max_tokens))
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.open_streams(
            prompts,
            sampling,
            rid,
            kind=RequestKind.COMPLETION,
            priority=req.priority,
            stream=req.stream,
        )
        echo_texts = None
        if req.echo:
            raw = req.prompts()
            echo_texts = [p if isinstance(p, str) else self._decode(p) for p in raw]
        if req.stream:
            return self._sse(
                self._completion_chunks(req, rid, streams, prompts, echo_texts), streams
            )
        outputs = await self.collect(request, streams)
        choices = []
        num_completion = 0
        for pi, out in enumerate(outputs):
            for c in out.outputs:
                num_completion += len(c.token_ids)
                text = c.text if echo_texts is None else echo_texts[pi] + c.text
                choices.append(
                    {
                        "index": pi * req.n + c.index,
                        "text": text,
                        "logprobs": self._completion_logprobs(c, 0)
                        if req.logprobs is not None
                        else None,
                        "finish_reason": _finish_reason(c.finish_reason),
                        "stop_reason": c.stop_reason,
                    }
                )
        num_prompt = sum(len(p) for p in prompts)
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": choices,
                "usage": _usage(num_prompt, num_completion),
            }
        )

    async def _completion_chunks(
        self,
        req: CompletionRequest,
        rid: str,
        streams: list[RequestStream],
        prompts: list[list[int]],
        echo_texts: list[str] | None,
    ) -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())
        num_completion = 0
        offsets: dict[int, int] = {}
        if echo_texts is not None:
            for pi, text in enumerate(echo_texts):
                for i in range(req.n):
                    yield self._completion_chunk(rid, created, pi * req.n + i, text, None, None)
        async for pi, out in _merge(streams):
            for c in out.outputs:
                num_completion += len(c.token_ids)
                index = pi * req.n + c.index
                if not (c.text or c.finish_reason or c.token_ids):
                    continue
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._completion_logprobs(c, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs["tokens"])
                yield self._completion_chunk(
                    rid, created, index, c.text, _finish_reason(c.finish_reason), logprobs
                )
        if req.include_usage:
            yield {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [],
                "usage": _usage(sum(len(p) for p in prompts), num_completion),
            }

    def _completion_chunk(
        self,
        rid: str,
        created: int,
        index: int,
        text: str,
        finish: str | None,
        logprobs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": [
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            ],
        }

    def _completion_logprobs(self, c: CompletionOutput, offset: int) -> dict[str, Any]:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for tid, entry in zip(c.token_ids, c.logprobs or []):
            text = self.token_text(tid)
            tokens.append(text)
            token_logprobs.append(entry.get(tid))
            top.append({self.token_text(t): lp for t, lp in entry.items()})
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    # ------------------------------------------------------------------ chat

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = await self.body(request, ChatCompletionRequest)
        self.check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        try:
            text = apply_chat_template(
                self.engine.tokenizer,
                [m.as_template_message() for m in req.messages],
                add_generation_prompt=req.add_generation_prompt,
                **dict(req.chat_template_kwargs or {}),
            )
        except InvalidRequestError:
            raise
        except Exception as exc:  # a template that rejects the conversation (jinja raise)
            raise APIError(
                400, f"the chat template rejected the messages: {exc}", param="messages"
            ) from None
        ids = self.tokenize(text, add_special_tokens=False)
        max_tokens = self.resolve_max_tokens(len(ids), req.requested_max_tokens(), "messages")
        sampling = self._sampling(req, max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.open_streams(
            [ids], sampling, rid, kind=RequestKind.CHAT, priority=req.priority, stream=req.stream
        )
        if req.stream:
            return self._sse(self._chat_chunks(req, rid, streams[0], len(ids)), streams)
        (out,) = await self.collect(request, streams)
        choices = []
        for c in out.outputs:
            choices.append(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": {"content": self._chat_logprobs(c, req.top_logprobs or 0)}
                    if req.logprobs
                    else None,
                    "finish_reason": _finish_reason(c.finish_reason),
                    "stop_reason": c.stop_reason,
                }
            )
        num_completion = sum(len(c.token_ids) for c in out.outputs)
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": choices,
                "usage": _usage(len(ids), num_completion),
            }
        )

    async def _chat_chunks(
        self, req: ChatCompletionRequest, rid: str, stream: RequestStream, num_prompt: int
    ) -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())

        def chunk(index: int, delta: dict[str, Any], finish: str | None, lp: Any) -> dict:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
                ],
            }

        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""}, None, None)
        num_completion = 0
        async for _, out in _merge([stream]):
            for c in out.outputs:
                num_completion += len(c.token_ids)
                if not (c.text or c.finish_reason or c.token_ids):
                    continue
                lp = None
                if req.logprobs:
                    lp = {"content": self._chat_logprobs(c, req.top_logprobs or 0)}
                delta = {"content": c.text} if c.text else {}
                yield chunk(c.index, delta, _finish_reason(c.finish_reason), lp)
        if req.include_usage:
            yield {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [],
                "usage": _usage(num_prompt, num_completion),
            }

    def _chat_logprobs(self, c: CompletionOutput, top_k: int) -> list[dict[str, Any]]:
        content = []
        for tid, entry in zip(c.token_ids, c.logprobs or []):
            text = self.token_text(tid)
            ranked = sorted(((t, lp) for t, lp in entry.items()), key=lambda x: -x[1])[:top_k]
            content.append(
                {
                    "token": text,
                    "logprob": entry.get(tid),
                    "bytes": list(text.encode("utf-8")),
                    "top_logprobs": [
                        {
                            "token": self.token_text(t),
                            "logprob": lp,
                            "bytes": list(self.token_text(t).encode("utf-8")),
                        }
                        for t, lp in ranked
                    ],
                }
            )
        return content

    # ------------------------------------------------------------------ shared

    def _sampling(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> Any:
        try:
            return req.to_sampling(max_tokens)
        except ValidationError as exc:
            raise _from_validation(exc) from None

    def _decode(self, ids: list[int]) -> str:
        tok = self.engine.tokenizer
        return "" if tok is None else str(tok.decode(ids))

    def _sse(
        self, chunks: AsyncIterator[dict[str, Any]], streams: list[RequestStream]
    ) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for item in chunks:
                    yield b"data: " + json.dumps(item).encode() + b"\n\n"
            except (SageLLMError, ValueError) as exc:
                err = _api_error_for(exc)
                yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
            except Exception:
                logger.exception("streaming failed")
                yield b"data: " + json.dumps(_internal_error().body()).encode() + b"\n\n"
            finally:
                for s in streams:
                    s.close()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ------------------------------------------------------------------ misc routes

    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "sagellm",
                    "root": self.engine.engine.config.model,
                    "max_model_len": self.engine.max_model_len,
                }
            ],
        }

    async def metrics(self) -> Response:
        if self.engine.is_healthy():
            try:
                stats = await asyncio.wait_for(self.engine.collect_stats(), timeout=30)
                self.publisher.publish(stats)
            except Exception:  # stale metrics beat a failed scrape
                logger.exception("collecting stats failed")
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.publisher.render(), media_type=CONTENT_TYPE_LATEST)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except BaseException as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _api_error_for(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return _from_validation(exc)
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), type="server_error", code="engine_dead")
    if isinstance(exc, RequestAbortedError):
        return APIError(499, str(exc), type="invalid_request_error", code="aborted")
    if isinstance(exc, (InvalidRequestError, ValueError)) and isinstance(exc, SageLLMError):
        return APIError(400, str(exc))
    if isinstance(exc, SageLLMError):
        return APIError(400, str(exc))
    return _internal_error()


def build_app(engine: AsyncLLMEngine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``engine``."""
    server = _Server(engine, config or ServerConfig())
    app = FastAPI(title="sageLLM", version=__version__, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _from_validation(exc).response()

    @app.exception_handler(SageLLMError)
    async def _sagellm_error(_: Request, exc: SageLLMError) -> JSONResponse:
        return _api_error_for(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), type=kind, code=code).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error", exc_info=exc)
        return _internal_error().response()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.chat(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return await server.models()

    @app.get("/health")
    async def health() -> Response:
        if engine.is_healthy():
            return JSONResponse({"status": "ok"})
        return APIError(503, "the engine loop is not running", type="server_error").response()

    @app.get("/metrics")
    async def metrics() -> Response:
        return await server.metrics()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    return app
