"""Request bodies of the OpenAI-compatible API and their mapping to SamplingParams.

Field names and defaults follow OpenAI's API reference; the extra sampling knobs
(``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ...)
follow vLLM's OpenAI server. Unknown fields are ignored, as OpenAI clients send fields
a server may not know (:func:`unknown_fields` lists them, so the server can warn or, when
strict, refuse); fields whose behaviour is not implemented are rejected when set to
something other than their neutral value, never silently ignored.

``cache_salt`` (vLLM's field) separates prefix caches: requests share cached prefixes
only with requests of the same tenant and the same salt.

Structured outputs (:mod:`sagellm.engine.structured`): OpenAI's ``response_format``
(``json_object``, ``json_schema``), vLLM's ``guided_json``/``guided_regex``/
``guided_choice``/``guided_grammar`` and its newer ``structured_outputs`` object; at most
one of them per request. Chat completions also take ``tools``, ``tool_choice`` and
``parallel_tool_calls`` (:mod:`sagellm.engine.server.tools`).

Also here: the bodies of ``/v1/embeddings``, ``/v1/responses`` (text in and out),
``/tokenize`` and ``/detokenize``.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from sagellm.core.errors import InvalidRequestError
from sagellm.core.types import SelfConsistency
from sagellm.engine.server.tools import ChatTool, NamedToolChoice
from sagellm.engine.structured import SamplingParams, StructuredOutput

__all__ = [
    "MAX_CACHE_SALT_CHARS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "EmbeddingRequest",
    "ResponsesRequest",
    "TokenizeRequest",
    "StreamOptions",
    "unknown_fields",
]

_LAX = ConfigDict(extra="ignore")

#: Longest accepted ``cache_salt``.
MAX_CACHE_SALT_CHARS = 256


class StreamOptions(BaseModel):
    """``stream_options`` of a streaming request."""

    model_config = _LAX

    include_usage: StrictBool = False  # send a last chunk with the usage and no choices


class _SamplingFields(BaseModel):
    """Sampling fields shared by completions and chat completions."""

    model_config = _LAX

    model: StrictStr
    n: StrictInt = Field(1, ge=1, le=128)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    presence_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    seed: StrictInt | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: StrictInt = Field(0, ge=-1)
    min_p: StrictFloat = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: StrictFloat = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    priority: StrictInt = 0  # lower runs first; default: the API key's priority, else 0
    cache_salt: str | None = None  # prefix-cache isolation within the tenant (vLLM's field)
    # prefill/decode disaggregation (vLLM's field): {"do_remote_decode": true} to a
    # kv_producer, the producer's returned object to the kv_consumer
    kv_transfer_params: dict[str, Any] | None = None
    thinking_token_budget: StrictInt | None = Field(None, ge=0)  # vLLM's reasoning cap
    # sagellm: {"n": 16, "method": "esc", "window": 4, "options": {...}}; returns the vote
    self_consistency: SelfConsistency | None = None
    # structured outputs: OpenAI's response_format, vLLM's guided_* and structured_outputs
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    structured_outputs: dict[str, Any] | None = None

    @field_validator("cache_salt", mode="before")
    @classmethod
    def _check_cache_salt(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str) or not 0 < len(value) <= MAX_CACHE_SALT_CHARS:
            raise PydanticCustomError(
                "cache_salt",
                f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} "
                "characters",
            )
        return value

    def _check_unsupported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported by this server")

    def _stop(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 16:
            raise InvalidRequestError("stop takes at most 16 strings")
        return tuple(s for s in stops if s)

    def structured_output(self) -> StructuredOutput | None:
        """The request's output constraint (None: free text); at most one source."""
        found: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type", "text")
            if kind == "json_object":
                found.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise InvalidRequestError(
                        "response_format json_schema needs json_schema.schema, a JSON schema "
                        'object: {"type": "json_schema", "json_schema": {"name": ..., '
                        '"schema": {...}}}'
                    )
                found.append(("response_format", {"json": spec["schema"]}))
            elif kind != "text":
                raise InvalidRequestError(
                    f"response_format type {kind!r} is not supported; use 'text', "
                    "'json_object' or 'json_schema'"
                )
        for name, key in (
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            value = getattr(self, name)
            if value is not None:
                if key == "json" and isinstance(value, str):
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError as exc:
                        raise InvalidRequestError(f"guided_json is not valid JSON: {exc}") from None
                found.append((name, {key: value}))
        so = self.structured_outputs
        if so is not None:
            given = {k: v for k, v in so.items() if v is not None and v is not False}
            found.append(("structured_outputs", given))
        if not found:
            return None
        if len(found) > 1:
            raise InvalidRequestError(
                "give one output constraint per request; got "
                + " and ".join(name for name, _ in found)
            )
        name, fields = found[0]
        try:
            return StructuredOutput.model_validate(fields)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem.get("loc", ()))
            detail = f"{where}: {problem['msg']}" if where else problem["msg"]
            raise InvalidRequestError(f"{name}: {detail}") from None

    def _sampling(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        structured: StructuredOutput | None = None,
    ) -> SamplingParams:
        self._check_unsupported()
        if structured is None:
            structured = self.structured_output()
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=self._stop(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            thinking_token_budget=self.thinking_token_budget,
            structured_output=structured,
        )

    @property
    def include_usage(self) -> bool:
        """True when a streaming response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """Body of ``POST /v1/completions``."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(16, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=20)  # vLLM's field
    suffix: str | None = None
    best_of: StrictInt | None = Field(None, ge=1)

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request (a list holds one string or token list per prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt is empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling(self, max_tokens: int | None) -> SamplingParams:
        """SamplingParams with ``max_tokens`` resolved by the server."""
        if self.suffix:
            raise InvalidRequestError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported by this server")
        return self._sampling(max_tokens, self.logprobs)


class _TextPart(BaseModel):
    model_config = _LAX

    type: Literal["text"]
    text: StrictStr


class _CalledFunction(BaseModel):
    model_config = _LAX

    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class _AssistantToolCall(BaseModel):
    """A call an earlier assistant turn made (``messages[].tool_calls[]``)."""

    model_config = _LAX

    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: _CalledFunction


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = _LAX

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[_TextPart] | None = None
    name: str | None = None
    tool_calls: list[_AssistantToolCall] | None = None  # an assistant turn's calls
    tool_call_id: StrictStr | None = None  # the call a tool message answers

    def as_template_message(self) -> dict[str, Any]:
        """The mapping a chat template expects: ``{role, content}``, plus ``tool_calls``
        (arguments as objects, as Hugging Face templates read them) and ``tool_call_id``."""
        if isinstance(self.content, list):
            text = "".join(p.text for p in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": text}
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    args = json.loads(c.function.arguments)
                except json.JSONDecodeError:
                    raise InvalidRequestError(
                        f"the arguments of the earlier call to {c.function.name!r} are not JSON"
                    ) from None
                calls.append(
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": args},
                    }
                )
            message["tool_calls"] = calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_SamplingFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the current name) or ``max_tokens`` (the old one)."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )

    def effective_tool_choice(self) -> Literal["none", "auto", "required"] | NamedToolChoice:
        """``tool_choice`` with OpenAI's defaults: ``auto`` with tools, ``none`` without."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        if self.tool_choice != "none" and not self.tools:
            raise InvalidRequestError("tool_choice needs tools: give the functions in tools")
        return self.tool_choice

    def to_sampling(
        self, max_tokens: int | None, tool_constraint: StructuredOutput | None = None
    ) -> SamplingParams:
        """SamplingParams with ``max_tokens`` resolved by the server; ``tool_constraint``
        is the grammar of a required or named tool choice."""
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        structured = self.structured_output()
        if tool_constraint is not None:
            if structured is not None:
                raise InvalidRequestError(
                    "a required or named tool_choice already constrains the reply; drop "
                    "response_format/guided_* or use tool_choice 'auto'"
                )
            structured = tool_constraint
        return self._sampling(max_tokens, logprobs, structured)


class EmbeddingRequest(BaseModel):
    """Body of ``POST /v1/embeddings``."""

    model_config = _LAX

    model: StrictStr
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None  # only the model's hidden size is accepted
    user: str | None = None
    priority: StrictInt = 0
    add_special_tokens: StrictBool = True  # vLLM's field

    def inputs(self) -> list[str | list[int]]:
        """The inputs (one string or token list each)."""
        p = self.input
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("input is empty: give a string, strings or token ids")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(BaseModel):
    """Body of ``POST /tokenize``: a ``prompt`` or chat ``messages`` (vLLM's API)."""

    model_config = _LAX

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None  # default: true for a prompt, false for chat
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    """Body of ``POST /detokenize``."""

    model_config = _LAX

    model: StrictStr | None = None
    tokens: list[StrictInt]


class _ResponseContent(BaseModel):
    model_config = _LAX

    type: Literal["input_text", "output_text", "text"]
    text: StrictStr


class ResponseInputMessage(BaseModel):
    """A message item of a Responses API ``input`` list."""

    model_config = _LAX

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[_ResponseContent]

    def text(self) -> str:
        """The message's text."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponsesRequest(BaseModel):
    """Body of ``POST /v1/responses`` (text input and output)."""

    model_config = _LAX

    model: StrictStr
    input: StrictStr | list[ResponseInputMessage]
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    stream: StrictBool = False
    user: str | None = None
    priority: StrictInt = 0

    def messages(self) -> list[dict[str, Any]]:
        """The conversation for the chat template: instructions first, as a system turn."""
        out: list[dict[str, Any]] = []
        if self.instructions:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            out.append({"role": "user", "content": self.input})
        else:
            for m in self.input:
                role = "system" if m.role == "developer" else m.role
                out.append({"role": role, "content": m.text()})
        return out

    def to_sampling(self, max_tokens: int) -> SamplingParams:
        """SamplingParams with ``max_tokens`` resolved by the server."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
        )


def unknown_fields(model: type[BaseModel], data: Mapping[str, Any]) -> list[str]:
    """Paths of the keys of ``data`` that ``model`` does not know, in order of appearance.

    Nested models are followed (``stream_options.x``, ``messages[].x``,
    ``messages[].content[].x``); list positions are left out so one misspelt key in a
    long conversation is one name. Values are never part of the result.
    """
    found: dict[str, None] = {}
    _walk(model, data, "", found)
    return list(found)


def _walk(model: type[BaseModel], data: Mapping[str, Any], prefix: str, found: dict) -> None:
    known: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        known[name] = info.annotation
        for alias in (info.alias, info.validation_alias):
            if isinstance(alias, str):
                known[alias] = info.annotation
    for key, value in data.items():
        if key not in known:
            found[f"{prefix}{key}"] = None
            continue
        nested = next(_models_in(known[key]), None)
        if nested is None:
            continue
        if isinstance(value, Mapping):
            _walk(nested, value, f"{prefix}{key}.", found)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    _walk(nested, item, f"{prefix}{key}[].", found)


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models an annotation holds (``X | None``, ``list[X]``, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin in (dict, Mapping) or origin is Literal:
        return  # free-form mappings (chat_template_kwargs, ...) are not checked
    if origin is not None or isinstance(annotation, types.UnionType):
        for arg in typing.get_args(annotation):
            yield from _models_in(arg)
