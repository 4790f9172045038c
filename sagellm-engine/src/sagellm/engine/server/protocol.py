"""Request bodies of the OpenAI-compatible API and their mapping to SamplingParams.

Field names and defaults follow OpenAI's API reference; the extra sampling knobs
(``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ...)
follow vLLM's OpenAI server. Unknown fields are ignored, as OpenAI clients send fields
a server may not know (:func:`unknown_fields` lists them, so the server can warn or, when
strict, refuse); fields whose behaviour is not implemented are rejected when set to
something other than their neutral value, never silently ignored.

``cache_salt`` (vLLM's field) separates prefix caches: requests share cached prefixes
only with requests of the same tenant and the same salt.
"""

from __future__ import annotations

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
    field_validator,
)
from pydantic_core import PydanticCustomError

from sagellm.core.errors import InvalidRequestError
from sagellm.core.types import SamplingParams, SelfConsistency

__all__ = [
    "MAX_CACHE_SALT_CHARS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
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
    thinking_token_budget: StrictInt | None = Field(None, ge=0)  # vLLM's reasoning cap
    # sagellm: {"n": 16, "method": "esc", "window": 4, "options": {...}}; returns the vote
    self_consistency: SelfConsistency | None = None

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

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        self._check_unsupported()
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


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = _LAX

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[_TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        """The ``{role, content}`` mapping a chat template expects."""
        if isinstance(self.content, list):
            text = "".join(p.text for p in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(_SamplingFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the current name) or ``max_tokens`` (the old one)."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )

    def to_sampling(self, max_tokens: int | None) -> SamplingParams:
        """SamplingParams with ``max_tokens`` resolved by the server."""
        if self.tools:
            raise InvalidRequestError("tools are not supported by this server")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequestError("only response_format {'type': 'text'} is supported")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, logprobs)


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
