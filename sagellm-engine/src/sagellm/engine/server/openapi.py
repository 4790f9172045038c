"""The OpenAPI description of the server: request bodies and responses of every route.

The handlers read their bodies themselves (size limit before parsing, unknown-field
warnings, OpenAI-style errors), so FastAPI does not see the request models; this module
puts them into the schema with :func:`describe`, together with the response models
below. The response models document the JSON the handlers build; they are not used to
serialise it.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

__all__ = [
    "ERROR_RESPONSES",
    "ChatCompletionResponse",
    "CompletionResponse",
    "DetokenizeResponse",
    "EmbeddingResponse",
    "ErrorResponse",
    "HealthResponse",
    "ModelList",
    "ResponseObject",
    "TokenizeResponse",
    "VersionResponse",
    "describe",
]


class ErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, whatever the status."""

    error: ErrorBody


class _PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    """Token counts of a completion or chat completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: _PromptTokensDetails


class _CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class _PromptLogprob(BaseModel):
    logprob: float
    rank: int
    decoded_token: str


class CompletionChoice(BaseModel):
    """One choice of a completion."""

    index: int
    text: str
    logprobs: _CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None
    prompt_logprobs: list[dict[str, _PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    """``POST /v1/completions`` (a stream sends chunks of the same shape as SSE)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class _TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class _TokenLogprob(_TopLogprob):
    top_logprobs: list[_TopLogprob]


class _ChatLogprobs(BaseModel):
    content: list[_TokenLogprob]


class _ToolCallFunction(BaseModel):
    name: str
    arguments: str


class _ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: _ToolCallFunction


class ChatReply(BaseModel):
    """The assistant message of a chat choice."""

    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: ChatReply
    logprobs: _ChatLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    """``POST /v1/chat/completions`` (a stream sends ``chat.completion.chunk`` as SSE)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    self_consistency: dict[str, Any] | None = None


class Embedding(BaseModel):
    """One input's vector: floats, or base64 of little-endian float32."""

    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class _EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """``POST /v1/embeddings``."""

    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[Embedding]
    usage: _EmbeddingUsage


class TokenizeResponse(BaseModel):
    """``POST /tokenize``."""

    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    """``POST /detokenize``."""

    prompt: str


class _OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class _OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: str
    role: Literal["assistant"]
    content: list[_OutputText]


class _ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    """``POST /v1/responses`` (a stream sends ``response.*`` events as SSE)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    output: list[_OutputMessage]
    incomplete_details: dict[str, str] | None
    error: ErrorBody | None
    usage: _ResponseUsage | None


class _ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int
    device: str  # the device kind the engine runs on ("cpu", "cuda", "npu", ...)


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"]
    data: list[_ModelCard]


class HealthResponse(BaseModel):
    """``GET /health`` while the engine runs."""

    status: Literal["ok"]


class VersionResponse(BaseModel):
    """``GET /version``."""

    version: str


#: The error statuses every route may answer, documented once.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "invalid request"),
        (401, "missing or invalid API key"),
        (404, "unknown model or route"),
        (413, "body over the size limit"),
        (429, "over the tenant's limits"),
        (500, "internal error"),
        (503, "the engine cannot take more"),
    )
}


def describe(app: FastAPI, bodies: dict[str, type[BaseModel]], streams: set[str]) -> None:
    """Give ``app`` an OpenAPI schema with the request model of each POST path in
    ``bodies``; the paths in ``streams`` also document their ``text/event-stream``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in bodies.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            op = schema["paths"][path]["post"]
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}
                    }
                },
            }
            if path in streams:
                op["responses"]["200"]["content"]["text/event-stream"] = {
                    "schema": {"type": "string", "description": "server-sent events"}
                }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
