"""OpenAI-compatible HTTP API over an :class:`AsyncLLMEngine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/responses``
(all three with SSE streaming), ``POST /v1/embeddings``, ``POST /tokenize``,
``POST /detokenize``, ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus),
``GET /version``.
Every error is returned in OpenAI's schema ``{"error": {"message", "type", "param",
"code"}}``: 400 for invalid requests (including what FastAPI would report as 422), 401
without a valid API key, 404 for an unknown model or route, 413 for a body over the size
limit, 429 beyond the tenant's limits (with ``Retry-After``), 503 when the engine cannot
take more, 500 for internal failures (logged, never described to the client).

With API keys configured, every ``/v1/*`` route (and ``/metrics`` unless public) needs
``Authorization: Bearer <key>``; the key's tenant and the request's ``cache_salt`` go to
the engine, which shares cached prefixes only within one tenant and salt. Bodies are
read up to the size limit and never further; tokenization and chat templates run on
worker threads, so a huge prompt does not hold up the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from sagellm.core.errors import InvalidRequestError, RequestAbortedError, SageLLMError
from sagellm.core.types import CompletionOutput, FinishReason, RequestKind, RequestOutput
from sagellm.engine._version import __version__
from sagellm.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from sagellm.engine.config import ServerConfig
from sagellm.engine.cot import CoTOptions, ReasoningMarkers, ReasoningStream, split_reasoning
from sagellm.engine.llm import apply_chat_template
from sagellm.engine.llm_engine import EngineRequestOutput, PoolingParams
from sagellm.engine.metrics import PrometheusPublisher
from sagellm.engine.server import openapi as oa
from sagellm.engine.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ResponsesRequest,
    TokenizeRequest,
    unknown_fields,
)
from sagellm.engine.server.rate_limiter import Admission, RateLimiter, Refusal
from sagellm.engine.server.tenants import Tenant, Tenants
from sagellm.engine.server.tools import (
    ChatTool,
    NamedToolChoice,
    make_parser,
    render_tool_messages,
    tool_grammar,
)
from sagellm.engine.structured import StructuredOutput

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
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

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
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes",
        code="request_too_large",
    )


def _rate_limited(refusal: Refusal) -> APIError:
    return APIError(
        429,
        refusal.message,
        type=refusal.kind,
        code="rate_limit_exceeded",
        headers={"Retry-After": str(refusal.retry_after_s)},
    )


#: Where the auth middleware leaves the request's tenant in the ASGI scope.
_TENANT_SCOPE_KEY = "sagellm.tenant"


class _AuthMiddleware:
    """Checks the API key of every ``/v1/*`` request (and ``/metrics`` unless public).

    Runs before routing, so an unknown ``/v1`` route answers 401 too and tells a client
    without a key nothing about the API. The tenant goes into the scope for the handlers.
    """

    def __init__(self, app: ASGIApp, tenants: Tenants, metrics_public: bool) -> None:
        self.app = app
        self.tenants = tenants
        self.metrics_public = metrics_public

    def _needs_key(self, path: str) -> bool:
        if path == "/metrics":
            return not self.metrics_public
        return path == "/v1" or path.startswith("/v1/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tenants.requires_key:
            await self.app(scope, receive, send)
            return
        tenant = None
        if self._needs_key(scope["path"]):
            header = Headers(scope=scope).get("authorization")
            tenant = self.tenants.authenticate(header)
            if tenant is None:
                # Neither message nor log line carries what the client sent.
                logger.info("refused a request to %s: no valid API key", scope["path"])
                message = (
                    "missing API key: send it as 'Authorization: Bearer <key>'"
                    if header is None
                    else "invalid API key"
                )
                err = APIError(
                    401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
                await err.response()(scope, receive, send)
                return
        scope[_TENANT_SCOPE_KEY] = tenant
        await self.app(scope, receive, send)


class _Flight:
    """An admitted request's engine streams and tenant slot, given back together once."""

    def __init__(self, admission: Admission, streams: list[RequestStream], num_prompt: int) -> None:
        self.admission = admission
        self.streams = streams
        self.num_prompt_tokens = num_prompt
        self.num_completion_tokens = 0  # updated while outputs arrive (charged on close)
        self.num_cached_tokens: dict[int, int] = {}  # stream position -> prompt tokens hit

    def observe(self, position: int, out: RequestOutput, num_new_tokens: int) -> None:
        """Account one output of the stream at ``position``."""
        self.num_completion_tokens += num_new_tokens
        self.num_cached_tokens[position] = out.metrics.num_cached_tokens

    def close(self) -> None:
        """Abort what still runs and release the tenant's slot; idempotent."""
        for s in self.streams:
            s.close()
        self.admission.release(self.num_prompt_tokens + self.num_completion_tokens)


class _SSEResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends.

    The body generator's ``finally`` does not run when the client disconnects before
    the first chunk is pulled (a generator never started has nothing to finalise), so
    the response releases the request's resources itself as well.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _finish_reason(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    if reason is FinishReason.ABORT:
        return "abort"
    return reason.value


def _kv_transfer(outputs: Sequence[Any]) -> dict[str, Any]:
    """A kv_producer's offer of the prompt's KV (vLLM's top-level ``kv_transfer_params``;
    nothing when the request did not ask for one)."""
    params = [p for p in (getattr(o, "kv_transfer_params", None) for o in outputs) if p]
    return {"kv_transfer_params": params[0]} if params else {}


def _consistency(out: Any) -> dict[str, Any]:
    """The self-consistency vote of a reply, under its own key (nothing without one)."""
    vote = getattr(out, "consistency", None)
    if vote is None:
        return {}
    return {
        "self_consistency": {
            "answer": vote.answer,
            "num_samples": vote.num_samples,
            "num_votes": vote.num_votes,
            "confidence": vote.confidence,
        }
    }


@dataclass(frozen=True)
class _ToolPlan:
    """How a chat request uses its tools."""

    tools: list[ChatTool]
    parser: str  # --tool-call-parser format of the reply
    constraint: StructuredOutput | None  # the grammar of a required or named choice


def _template_takes_tools(tokenizer: Any) -> bool:
    """True when the chat template renders ``tools`` itself."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template


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
        self.tenants = Tenants(config)
        self.limiter = RateLimiter()
        self.reasoning: ReasoningMarkers | None = None
        if config.reasoning_markers is not None:
            start, end = config.reasoning_markers
            self.reasoning = ReasoningMarkers(start=start, end=end)
            engine.engine.cot.configure(self.reasoning)

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

    async def read_body(self, request: Request) -> bytes:
        """The raw body, refused with 413 as soon as it is known to exceed the limit."""
        limit = self.config.max_request_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, "the Content-Length header is not a number")
            if int(length) > limit:
                raise _too_large(limit)  # before reading a byte of it
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # chunked uploads: count while reading
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def body(self, request: Request, model: type[BaseModel]) -> Any:
        raw = await self.read_body(request)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        unknown = unknown_fields(model, data)
        if unknown:
            names = ", ".join(_field_name(n) for n in unknown[:32])
            if len(unknown) > 32:
                names += f" (and {len(unknown) - 32} more)"
            if self.config.strict_request_fields:
                raise APIError(
                    400,
                    f"Unrecognized request arguments supplied: {names} (this server rejects "
                    "unknown fields)",
                    param=_field_name(unknown[0]),
                    code="unknown_field",
                )
            logger.warning(
                "a request to %s has fields this server ignores: %s", request.url.path, names
            )
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _from_validation(exc) from None

    async def tokenize(self, prompt: str | list[int], *, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            tok = self.engine.tokenizer
            if tok is None:
                raise APIError(400, "this server has no tokenizer: send token ids", param="prompt")
            # On a worker thread: a long prompt must not stall the other clients.
            encode = functools.partial(tok.encode, prompt, add_special_tokens=add_special_tokens)
            ids: list[int] = await asyncio.to_thread(encode)
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

    async def start(
        self,
        request: Request,
        req: CompletionRequest | ChatCompletionRequest | ResponsesRequest | EmbeddingRequest,
        prompts: Sequence[list[int]],
        sampling: Any,
        base_id: str,
        *,
        kind: RequestKind,
        **engine_kwargs: Any,
    ) -> _Flight:
        """Admit the request (server and tenant limits) and queue its prompts."""
        if self.engine.num_live_requests + len(prompts) > self.config.max_concurrent_requests:
            raise APIError(
                503,
                "the server is at its request limit; retry later",
                type="server_error",
                code="overloaded",
            )
        tenant = _tenant_of(request, self.tenants.anonymous)
        num_prompt = sum(len(p) for p in prompts)
        max_tokens = 0 if sampling is None else (sampling.max_tokens or 0) * sampling.n
        admission = self.limiter.acquire(tenant, num_prompt + max_tokens * len(prompts))
        if isinstance(admission, Refusal):
            raise _rate_limited(admission)
        priority = req.priority
        if tenant.priority is not None and "priority" not in req.model_fields_set:
            priority = tenant.priority
        streams: list[RequestStream] = []
        flight = _Flight(admission, streams, num_prompt)
        self_consistency = getattr(req, "self_consistency", None)
        kv_params = getattr(req, "kv_transfer_params", None)
        if kv_params:
            if len(prompts) != 1:
                flight.close()
                raise InvalidRequestError(
                    "kv_transfer_params apply to one prompt: send one request per prompt"
                )
            engine_kwargs["kv_transfer_params"] = kv_params
        try:
            for i, ids in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(
                    await self.engine.add_request(
                        ids,
                        sampling,
                        rid,
                        delta=getattr(req, "stream", False),
                        kind=kind,
                        priority=priority,
                        tenant=tenant.name,
                        cache_salt=getattr(req, "cache_salt", None) or "",
                        cot=CoTOptions(self_consistency=self_consistency)
                        if self_consistency is not None
                        else None,
                        **engine_kwargs,
                    )
                )
        except BaseException:
            flight.close()
            raise
        return flight

    async def collect(self, request: Request, flight: _Flight) -> list[RequestOutput]:
        """Final outputs of every stream; a client disconnect aborts them all."""
        streams = flight.streams

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
            outputs: list[RequestOutput] = work.result()
            for i, out in enumerate(outputs):
                flight.observe(i, out, sum(len(c.token_ids) for c in out.outputs))
            return outputs
        finally:
            watch.cancel()
            flight.close()

    # ------------------------------------------------------------------ completions

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await self.body(request, CompletionRequest)
        self.check_model(req.model)
        prompts = [await self.tokenize(p, add_special_tokens=True) for p in req.prompts()]
        max_tokens = [self.resolve_max_tokens(len(p), req.max_tokens, "prompt") for p in prompts]
        # One max_tokens for all prompts keeps one SamplingParams; take the tightest.
        sampling = self._sampling(req, min(max_tokens))
        rid = f"cmpl-{uuid.uuid4().hex}"
        extra: dict[str, Any] = {}
        if req.prompt_logprobs is not None:
            extra["prompt_logprobs"] = req.prompt_logprobs
        flight = await self.start(
            request, req, prompts, sampling, rid, kind=RequestKind.COMPLETION, **extra
        )
        try:
            echo_texts = None
            if req.echo:
                raw = req.prompts()
                echo_texts = [p if isinstance(p, str) else await self._decode(p) for p in raw]
        except BaseException:
            flight.close()
            raise
        if req.stream:
            return self._sse(self._completion_chunks(req, rid, flight, echo_texts), flight)
        outputs = await self.collect(request, flight)
        choices = []
        for pi, out in enumerate(outputs):
            for c in out.outputs:
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
                        **(
                            {"prompt_logprobs": self._prompt_logprobs(out)}
                            if req.prompt_logprobs is not None
                            else {}
                        ),
                    }
                )
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": choices,
                "usage": _usage(flight),
                **_kv_transfer(outputs),
            }
        )

    async def _completion_chunks(
        self,
        req: CompletionRequest,
        rid: str,
        flight: _Flight,
        echo_texts: list[str] | None,
    ) -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())
        offsets: dict[int, int] = {}
        # prompt_logprobs, formatted once per prompt: every choice carries them in one chunk,
        # its first since they are known (they come with the first token)
        prompt_logprobs: dict[int, list[dict[str, Any] | None]] = {}
        pending = (
            set(range(len(flight.streams) * req.n)) if req.prompt_logprobs is not None else set()
        )
        if echo_texts is not None:
            for pi, text in enumerate(echo_texts):
                for i in range(req.n):
                    yield self._completion_chunk(rid, created, pi * req.n + i, text, None, None)
        async for pi, out in _merge(flight.streams):
            flight.observe(pi, out, sum(len(c.token_ids) for c in out.outputs))
            if pending and isinstance(out, EngineRequestOutput) and out.prompt_logprobs is not None:
                prompt_logprobs[pi] = self._prompt_logprobs(out)
            for c in out.outputs:
                index = pi * req.n + c.index
                plp = prompt_logprobs.get(pi) if index in pending else None
                if not (c.text or c.finish_reason or c.token_ids or plp is not None):
                    continue
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._completion_logprobs(c, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs["tokens"])
                chunk = self._completion_chunk(
                    rid, created, index, c.text, _finish_reason(c.finish_reason), logprobs
                )
                if plp is not None:
                    chunk["choices"][0]["prompt_logprobs"] = plp
                    pending.discard(index)
                yield chunk
        if req.include_usage:
            yield {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [],
                "usage": _usage(flight),
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

    def _prompt_logprobs(self, out: RequestOutput) -> list[dict[str, Any] | None]:
        """vLLM's ``prompt_logprobs``: None for the first token, then token id -> entry."""
        got = out.prompt_logprobs if isinstance(out, EngineRequestOutput) else None
        assert got is not None
        return [
            None
            if entry is None
            else {
                str(t): {
                    "logprob": lp.logprob,
                    "rank": lp.rank,
                    "decoded_token": self.token_text(t),
                }
                for t, lp in entry.items()
            }
            for entry in got
        ]

    # ------------------------------------------------------------------ embeddings

    @property
    def hidden_size(self) -> int | None:
        mc = getattr(self.engine.engine.runtime, "model_config", None)
        size = getattr(mc, "hidden_size", None)
        return int(size) if size is not None else None

    async def embeddings(self, request: Request) -> Response:
        req: EmbeddingRequest = await self.body(request, EmbeddingRequest)
        self.check_model(req.model)
        size = self.hidden_size
        if req.dimensions is not None and req.dimensions != size:
            raise APIError(
                400,
                f"dimensions={req.dimensions} is not supported: this model's embeddings have "
                f"{size} dimensions; leave dimensions out or set it to {size}",
                param="dimensions",
            )
        prompts = [
            await self.tokenize(p, add_special_tokens=req.add_special_tokens) for p in req.inputs()
        ]
        limit = self.engine.max_model_len
        for ids in prompts:
            if not ids:
                raise APIError(400, "an input is empty", param="input")
            if len(ids) >= limit:
                raise APIError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"input resulted in {len(ids)} tokens. Please reduce the length of the "
                    "input.",
                    param="input",
                    code="context_length_exceeded",
                )
        pooling = PoolingParams(self.config.pooling, self.config.normalize_embeddings)
        rid = f"embd-{uuid.uuid4().hex}"
        flight = await self.start(
            request, req, prompts, None, rid, kind=RequestKind.ONE_OFF, pooling=pooling
        )
        outputs = await self.collect(request, flight)
        data = []
        for i, out in enumerate(outputs):
            vec = out.embedding if isinstance(out, EngineRequestOutput) else None
            assert vec is not None
            value: list[float] | str = vec
            if req.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        num_prompt = flight.num_prompt_tokens
        return JSONResponse(
            {
                "id": rid,
                "object": "list",
                "created": int(time.time()),
                "model": self.model_name,
                "data": data,
                "usage": {"prompt_tokens": num_prompt, "total_tokens": num_prompt},
            }
        )

    # ------------------------------------------------------------------ tokenizer

    async def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, **kwargs: Any
    ) -> str:
        """The chat template applied to ``messages`` (on a worker thread)."""
        render = functools.partial(
            apply_chat_template,
            self.engine.tokenizer,
            messages,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
        try:
            text: str = await asyncio.to_thread(render)  # templates can be slow: off the loop
        except InvalidRequestError:
            raise
        except Exception as exc:  # a template that rejects the conversation (jinja raise)
            raise APIError(
                400, f"the chat template rejected the messages: {exc}", param="messages"
            ) from None
        return text

    async def tokenize_route(self, request: Request) -> Response:
        req: TokenizeRequest = await self.body(request, TokenizeRequest)
        if req.model is not None:
            self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages (not both)", param="prompt")
        if req.messages is not None:
            text = await self.render_chat(
                [m.as_template_message() for m in req.messages],
                req.add_generation_prompt,
                **(req.chat_template_kwargs or {}),
            )
            add_special = bool(req.add_special_tokens)  # the template has placed them
        else:
            assert req.prompt is not None
            text = req.prompt
            add_special = req.add_special_tokens is not False
        ids = await self.tokenize(text, add_special_tokens=add_special)
        return JSONResponse(
            {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}
        )

    async def detokenize_route(self, request: Request) -> Response:
        req: DetokenizeRequest = await self.body(request, DetokenizeRequest)
        if req.model is not None:
            self.check_model(req.model)
        if self.engine.tokenizer is None:
            raise APIError(400, "this server has no tokenizer to detokenize with")
        vocab = self.engine.engine.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400,
                f"token id {bad[0]} is outside the vocabulary [0, {vocab}); use ids produced "
                "by this model's tokenizer",
                param="tokens",
            )
        return JSONResponse({"prompt": await self._decode(list(req.tokens))})

    # ------------------------------------------------------------------ responses

    async def responses(self, request: Request) -> Response:
        req: ResponsesRequest = await self.body(request, ResponsesRequest)
        self.check_model(req.model)
        if isinstance(req.input, list) and not req.input:
            raise APIError(400, "input must hold at least one message", param="input")
        text = await self.render_chat(req.messages(), True)
        ids = await self.tokenize(text, add_special_tokens=False)
        max_tokens = self.resolve_max_tokens(len(ids), req.max_output_tokens, "input")
        sampling = req.to_sampling(max_tokens)
        rid = f"resp_{uuid.uuid4().hex}"
        flight = await self.start(request, req, [ids], sampling, rid, kind=RequestKind.CHAT)
        msg_id = f"msg_{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            return self._sse_events(
                self._response_events(req, rid, msg_id, created, flight), flight
            )
        (out,) = await self.collect(request, flight)
        c = out.outputs[0]
        return JSONResponse(
            self._response_object(req, rid, msg_id, created, c.text, c.finish_reason, flight)
        )

    def _response_object(
        self,
        req: ResponsesRequest,
        rid: str,
        msg_id: str,
        created: int,
        text: str | None,
        finish: FinishReason | None,
        flight: _Flight,
    ) -> dict[str, Any]:
        """A Responses API ``response``; ``text`` None: still in progress (no output yet)."""
        output: list[dict[str, Any]] = []
        status = "in_progress"
        incomplete = None
        if text is not None:
            status = "incomplete" if finish is FinishReason.LENGTH else "completed"
            if finish is FinishReason.LENGTH:
                incomplete = {"reason": "max_output_tokens"}
            output.append(
                {
                    "type": "message",
                    "id": msg_id,
                    "status": status,
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            )
        usage = None
        if text is not None:
            prompt, completion = flight.num_prompt_tokens, flight.num_completion_tokens
            usage = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": sum(flight.num_cached_tokens.values())},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "model": self.model_name,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "output": output,
            "incomplete_details": incomplete,
            "error": None,
            "usage": usage,
        }

    async def _response_events(
        self, req: ResponsesRequest, rid: str, msg_id: str, created: int, flight: _Flight
    ) -> AsyncIterator[dict[str, Any]]:
        yield {
            "type": "response.created",
            "response": self._response_object(req, rid, msg_id, created, None, None, flight),
        }
        text = ""
        finish: FinishReason | None = None
        async for _, out in _merge(flight.streams):
            flight.observe(0, out, sum(len(c.token_ids) for c in out.outputs))
            c = out.outputs[0]
            finish = c.finish_reason or finish
            if c.text:
                text += c.text
                yield {
                    "type": "response.output_text.delta",
                    "item_id": msg_id,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": c.text,
                }
        yield {
            "type": "response.output_text.done",
            "item_id": msg_id,
            "output_index": 0,
            "content_index": 0,
            "text": text,
        }
        yield {
            "type": "response.completed",
            "response": self._response_object(req, rid, msg_id, created, text, finish, flight),
        }

    def _sse_events(
        self, events: AsyncIterator[dict[str, Any]], flight: _Flight
    ) -> StreamingResponse:
        """Server-sent events named by their ``type`` (the Responses API's stream)."""

        async def body() -> AsyncIterator[bytes]:
            seq = 0
            try:
                async for event in events:
                    event["sequence_number"] = seq
                    seq += 1
                    yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
            except (SageLLMError, ValueError) as exc:
                err = {"type": "error", "sequence_number": seq, **_api_error_for(exc).body()}
                yield f"event: error\ndata: {json.dumps(err)}\n\n".encode()
            except Exception:
                logger.exception("streaming failed")
                err = {"type": "error", "sequence_number": seq, **_internal_error().body()}
                yield f"event: error\ndata: {json.dumps(err)}\n\n".encode()
            finally:
                flight.close()

        return _SSEResponse(body(), flight.close)

    # ------------------------------------------------------------------ chat

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = await self.body(request, ChatCompletionRequest)
        self.check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        plan = self._tool_plan(req)
        messages = [m.as_template_message() for m in req.messages]
        template_kwargs = dict(req.chat_template_kwargs or {})
        if plan is not None:
            if _template_takes_tools(self.engine.tokenizer):
                template_kwargs["tools"] = [t.as_dict() for t in plan.tools]
            else:
                messages = render_tool_messages(messages, plan.tools, plan.parser)
        render = functools.partial(
            apply_chat_template,
            self.engine.tokenizer,
            messages,
            add_generation_prompt=req.add_generation_prompt,
            **template_kwargs,
        )
        try:
            text = await asyncio.to_thread(render)  # templates can be slow: off the loop
        except InvalidRequestError:
            raise
        except Exception as exc:  # a template that rejects the conversation (jinja raise)
            raise APIError(
                400, f"the chat template rejected the messages: {exc}", param="messages"
            ) from None
        ids = await self.tokenize(text, add_special_tokens=False)
        max_tokens = self.resolve_max_tokens(len(ids), req.requested_max_tokens(), "messages")
        sampling = self._sampling(req, max_tokens, plan.constraint if plan else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        flight = await self.start(request, req, [ids], sampling, rid, kind=RequestKind.CHAT)
        if req.stream:
            return self._sse(self._chat_chunks(req, rid, flight, plan), flight)
        (out,) = await self.collect(request, flight)
        choices = []
        for c in out.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            if self.reasoning is not None:
                message["reasoning_content"], message["content"] = split_reasoning(
                    c.text, self.reasoning
                )
            finish = _finish_reason(c.finish_reason)
            if plan is not None:
                content, calls = make_parser(plan.parser).parse(message["content"] or "")
                message["tool_calls"] = [call.as_dict() for call in calls]
                if calls:
                    message["content"] = content
                    if finish == "stop":
                        finish = "tool_calls"
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": {"content": self._chat_logprobs(c, req.top_logprobs or 0)}
                    if req.logprobs
                    else None,
                    "finish_reason": finish,
                    "stop_reason": c.stop_reason,
                }
            )
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": choices,
                "usage": _usage(flight),
                **_consistency(out),
                **_kv_transfer([out]),
            }
        )

    async def _chat_chunks(
        self, req: ChatCompletionRequest, rid: str, flight: _Flight, plan: _ToolPlan | None
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

        # self-consistency draws up to its own n; the role chunk comes with a sample's first
        roles = set(range(req.n)) if req.self_consistency is None else set()
        for i in sorted(roles):
            yield chunk(i, {"role": "assistant", "content": ""}, None, None)
        splits: dict[int, ReasoningStream] = {}
        parsers: dict[int, Any] = {}
        async for _, out in _merge(flight.streams):
            flight.observe(0, out, sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                if not (c.text or c.finish_reason or c.token_ids):
                    continue
                lp = None
                if req.logprobs:
                    lp = {"content": self._chat_logprobs(c, req.top_logprobs or 0)}
                if c.index not in roles:
                    roles.add(c.index)
                    yield chunk(c.index, {"role": "assistant", "content": ""}, None, None)
                delta: dict[str, Any] = {"content": c.text} if c.text else {}
                if self.reasoning is not None:
                    split = splits.setdefault(c.index, ReasoningStream(self.reasoning))
                    r, text = split.feed(c.text, final=c.finish_reason is not None)
                    delta = {"reasoning_content": r} if r else {}
                    if text:
                        delta["content"] = text
                finish = _finish_reason(c.finish_reason)
                if plan is not None:
                    parser = parsers.setdefault(c.index, make_parser(plan.parser))
                    content, calls = parser.feed(
                        delta.pop("content", ""), final=c.finish_reason is not None
                    )
                    if content:
                        delta["content"] = content
                    if calls:
                        first = parser.num_calls - len(calls)
                        delta["tool_calls"] = [
                            {"index": first + k, **call.as_dict()} for k, call in enumerate(calls)
                        ]
                    if finish == "stop" and parser.num_calls:
                        finish = "tool_calls"
                yield chunk(c.index, delta, finish, lp)
        if req.include_usage:
            yield {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [],
                "usage": _usage(flight),
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

    def _sampling(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        max_tokens: int,
        tool_constraint: StructuredOutput | None = None,
    ) -> Any:
        try:
            if isinstance(req, ChatCompletionRequest):
                return req.to_sampling(max_tokens, tool_constraint)
            return req.to_sampling(max_tokens)
        except ValidationError as exc:
            raise _from_validation(exc) from None

    def _tool_plan(self, req: ChatCompletionRequest) -> _ToolPlan | None:
        """How the request's tools are used; None when it has none (or tool_choice none)."""
        try:
            choice = req.effective_tool_choice()
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param="tool_choice") from None
        if choice == "none" or not req.tools:
            return None
        parser = self.config.tool_call_parser
        if choice == "auto":
            if not self.config.enable_auto_tool_choice or parser is None:
                raise APIError(
                    400,
                    'tool_choice "auto" (the default with tools) needs a server started with '
                    "--enable-auto-tool-choice and --tool-call-parser; or send tool_choice "
                    '"required", a named function or "none"',
                    param="tool_choice",
                )
            return _ToolPlan(list(req.tools), parser, None)
        parser = parser or "hermes"
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in req.tools]
            if choice.function.name not in names:
                raise APIError(
                    400,
                    f"tool_choice names the function {choice.function.name!r}, which is not "
                    f"in tools ({', '.join(repr(n) for n in names)})",
                    param="tool_choice",
                )
        constraint = tool_grammar(
            parser, req.tools, choice, parallel_tool_calls=req.parallel_tool_calls
        )
        return _ToolPlan(list(req.tools), parser, constraint)

    async def _decode(self, ids: list[int]) -> str:
        tok = self.engine.tokenizer
        return "" if tok is None else str(await asyncio.to_thread(tok.decode, ids))

    def _sse(self, chunks: AsyncIterator[dict[str, Any]], flight: _Flight) -> StreamingResponse:
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
                flight.close()
            yield b"data: [DONE]\n\n"

        return _SSEResponse(body(), flight.close)

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
                    "device": str(self.engine.engine.config.device).partition(":")[0],
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


def _usage(flight: _Flight) -> dict[str, Any]:
    prompt, completion = flight.num_prompt_tokens, flight.num_completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # OpenAI's field: prompt tokens served from the (tenant's own) prefix cache
        "prompt_tokens_details": {"cached_tokens": sum(flight.num_cached_tokens.values())},
    }


def _tenant_of(request: Request, anonymous: Tenant) -> Tenant:
    tenant = request.scope.get(_TENANT_SCOPE_KEY)
    return tenant if isinstance(tenant, Tenant) else anonymous


def _field_name(path: str) -> str:
    """A field name fit for a log line: bounded, control characters escaped."""
    short = path if len(path) <= 64 else path[:61] + "..."
    return ascii(short)[1:-1] if not short.isprintable() else short


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
    app.add_middleware(
        _AuthMiddleware, tenants=server.tenants, metrics_public=server.config.metrics_public
    )

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

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={200: {"model": oa.CompletionResponse}, **oa.ERROR_RESPONSES},
    )
    async def completions(request: Request) -> Response:
        return await server.completions(request)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={200: {"model": oa.ChatCompletionResponse}, **oa.ERROR_RESPONSES},
    )
    async def chat_completions(request: Request) -> Response:
        return await server.chat(request)

    @app.post(
        "/v1/embeddings",
        response_model=None,
        responses={200: {"model": oa.EmbeddingResponse}, **oa.ERROR_RESPONSES},
    )
    async def embeddings(request: Request) -> Response:
        return await server.embeddings(request)

    @app.post(
        "/v1/responses",
        response_model=None,
        responses={200: {"model": oa.ResponseObject}, **oa.ERROR_RESPONSES},
    )
    async def responses(request: Request) -> Response:
        return await server.responses(request)

    @app.post(
        "/tokenize",
        response_model=None,
        responses={200: {"model": oa.TokenizeResponse}, **oa.ERROR_RESPONSES},
    )
    async def tokenize(request: Request) -> Response:
        return await server.tokenize_route(request)

    @app.post(
        "/detokenize",
        response_model=None,
        responses={200: {"model": oa.DetokenizeResponse}, **oa.ERROR_RESPONSES},
    )
    async def detokenize(request: Request) -> Response:
        return await server.detokenize_route(request)

    @app.get(
        "/v1/models",
        response_model=None,
        responses={200: {"model": oa.ModelList}, **oa.ERROR_RESPONSES},
    )
    async def models() -> dict[str, Any]:
        return await server.models()

    @app.get(
        "/health",
        response_model=None,
        responses={200: {"model": oa.HealthResponse}, **oa.ERROR_RESPONSES},
    )
    async def health() -> Response:
        if engine.is_healthy():
            return JSONResponse({"status": "ok"})
        return APIError(503, "the engine loop is not running", type="server_error").response()

    @app.get(
        "/metrics",
        response_model=None,
        response_class=PlainTextResponse,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            **oa.ERROR_RESPONSES,
        },
    )
    async def metrics() -> Response:
        return await server.metrics()

    @app.get(
        "/version",
        response_model=None,
        responses={200: {"model": oa.VersionResponse}, **oa.ERROR_RESPONSES},
    )
    async def version() -> dict[str, str]:
        return {"version": __version__}

    oa.describe(
        app,
        {
            "/v1/completions": CompletionRequest,
            "/v1/chat/completions": ChatCompletionRequest,
            "/v1/embeddings": EmbeddingRequest,
            "/v1/responses": ResponsesRequest,
            "/tokenize": TokenizeRequest,
            "/detokenize": DetokenizeRequest,
        },
        streams={"/v1/completions", "/v1/chat/completions", "/v1/responses"},
    )
    return app
