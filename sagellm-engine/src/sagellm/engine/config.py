"""Configuration of the engine's own parts (assembly budget and HTTP server).

The slots (runtime, KV pool, scheduler, ...) are configured through
:class:`sagellm.core.config.EngineConfig`; what is here only concerns the engine package.

API keys: :class:`APIKey` is one key and the tenant it authenticates;
:func:`load_api_keys_file` reads a keys file, either a JSON or YAML mapping ::

    sk-alpha: {tenant: acme, priority: 0, max_concurrent_requests: 8,
               max_tokens_per_minute: 200000}
    sk-beta: {tenant: beta}
    sk-gamma: beta        # a string is the tenant
    sk-delta: null        # tenant derived from the key

or plain lines ``key`` / ``key tenant`` (``#`` starts a comment). A key is never
printed: its repr is masked and error messages name its position, not its value.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from sagellm.core.errors import ConfigError

__all__ = [
    "DEFAULT_KV_CACHE_MIB",
    "DEFAULT_MAX_REQUEST_BODY_BYTES",
    "APIKey",
    "BuildOptions",
    "ServerConfig",
    "api_keys_from",
    "load_api_keys_file",
]

#: KV-cache budget when the pool's options give no size. 256 MiB holds ~11,600 tokens of
#: SmolLM2-135M in bfloat16 (the default dtype on CPUs with native bf16), ~5,800 in
#: float32; with the ~1.1-1.2 GB the loaded model takes, a fully used pool keeps the
#: default engine under 1.5 GB resident (untouched blocks are not resident at all).
DEFAULT_KV_CACHE_MIB = 256

#: Largest request body the server reads (larger ones get 413 before being read).
DEFAULT_MAX_REQUEST_BODY_BYTES = 8 << 20

#: A pool never gets more blocks than this many full-length sequences need (a tiny model
#: would otherwise receive millions of blocks from the memory budget).
MAX_FULL_SEQUENCES = 64


class BuildOptions(BaseModel):
    """How the builder sizes what the config leaves open."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kv_cache_mib: int = Field(DEFAULT_KV_CACHE_MIB, ge=1)  # KV budget when num_blocks is unset
    load_tokenizer: bool = True  # False: token ids in, token ids out (no text)
    # vLLM's speculative_config ({"method": "ngram", ...}); None: no speculation
    speculative_config: dict[str, Any] | None = None
    # vLLM's kv_transfer_config ({"kv_connector": "torch", "kv_role": "kv_producer", ...}):
    # prefill/decode disaggregation (sagellm.engine.disagg); None: a standalone instance
    kv_transfer_config: dict[str, Any] | None = None


class APIKey(BaseModel):
    """One API key of the server, the tenant it authenticates and that tenant's limits.

    Keys that name the same tenant share its limits (they must not disagree on them).
    """

    # hide_input_in_errors: a validation error must not print the key it rejects
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    key: SecretStr  # the bearer token; repr and str show '**********'
    tenant: str | None = Field(None, min_length=1, max_length=256)  # None: from the key
    priority: int | None = None  # default priority of the tenant's requests (lower first)
    max_concurrent_requests: int | None = Field(None, ge=1)  # None: the server default
    max_tokens_per_minute: int | None = Field(None, ge=1)  # prompt + max_tokens charged

    @field_validator("key")
    @classmethod
    def _check_key(cls, key: SecretStr) -> SecretStr:
        value = key.get_secret_value()
        # The error must not echo the key, so no pydantic constraint (its message would).
        if not value or not value.isascii() or not value.isprintable() or " " in value:
            raise ValueError("an API key must be a non-empty ASCII string without whitespace")
        return key

    def tenant_name(self) -> str:
        """The tenant, or ``key-<first 8 hex digits of sha256(key)>`` when none is given."""
        if self.tenant is not None:
            return self.tenant
        digest = hashlib.sha256(self.key.get_secret_value().encode()).hexdigest()
        return f"key-{digest[:8]}"


class ServerConfig(BaseModel):
    """Options of the OpenAI-compatible HTTP server."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    host: str = "127.0.0.1"  # bind address
    port: int | None = Field(None, ge=0, le=65535)  # None: chosen by sagellm.core.ports
    served_model_name: str | None = None  # name in /v1/models (default: the model's name)
    max_concurrent_requests: int = Field(1024, ge=1)  # further requests get 503
    log_level: str = "warning"  # uvicorn log level
    # Keys accepted as `Authorization: Bearer <key>` on /v1/* (and /metrics); empty: the
    # server is open and every request belongs to the tenant "". Strings are keys whose
    # tenant is derived from them.
    api_keys: tuple[APIKey, ...] = ()
    metrics_public: bool = False  # /metrics without a key (when keys are configured)
    max_request_body_bytes: int = Field(DEFAULT_MAX_REQUEST_BODY_BYTES, ge=1)  # else 413
    # Per-tenant limits for tenants whose keys set none (None: unlimited); beyond them 429.
    tenant_max_concurrent_requests: int | None = Field(None, ge=1)
    tenant_max_tokens_per_minute: int | None = Field(None, ge=1)
    strict_request_fields: bool = False  # unknown request fields: 400 instead of a warning
    # (start, end) reasoning markers: chat replies split reasoning_content from content
    reasoning_markers: tuple[str, str] | None = None
    # Tool calls: the output format parsed for tool_choice "auto" (vLLM's names), and
    # whether "auto" is allowed at all (required/named choices work without either).
    tool_call_parser: Literal["hermes", "llama3_json"] | None = None
    enable_auto_tool_choice: bool = False
    # /v1/embeddings: the served model's final-norm hidden states, pooled over the prompt
    # (the last token's, or the mean of all) and scaled to unit L2 norm unless disabled
    pooling: Literal["last", "mean"] = "last"
    normalize_embeddings: bool = True

    @model_validator(mode="after")
    def _auto_needs_parser(self) -> ServerConfig:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(
                "enable_auto_tool_choice needs tool_call_parser (hermes or llama3_json)"
            )
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_from_strings(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple({"key": v} if isinstance(v, str) else v for v in value)
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_tenants(cls, keys: tuple[APIKey, ...]) -> tuple[APIKey, ...]:
        seen: set[str] = set()
        limits: dict[str, tuple[int | None, int | None, int | None]] = {}
        for i, k in enumerate(keys):
            value = k.key.get_secret_value()
            if value in seen:
                raise ValueError(f"API key #{i + 1} repeats an earlier key")
            seen.add(value)
            mine = (k.priority, k.max_concurrent_requests, k.max_tokens_per_minute)
            other = limits.setdefault(k.tenant_name(), mine)
            if other != mine:
                raise ValueError(
                    f"API key #{i + 1} gives tenant {k.tenant_name()!r} another priority or "
                    "other limits than an earlier key of that tenant"
                )
        return keys


def load_api_keys_file(path: str | os.PathLike[str]) -> list[APIKey]:
    """The keys of a keys file (format in the module docstring).

    Raises ConfigError for a missing, empty or malformed file; the message names the line
    or the key's position, never a key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API keys file {path}: {exc}") from None
    data: Any = None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            # the position only: the message of a JSON error may quote the document
            raise ConfigError(
                f"the API keys file {path} is not valid JSON (line {exc.lineno}, column "
                f"{exc.colno})"
            ) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None  # plain lines that happen not to be YAML
        if not isinstance(data, Mapping):
            data = None
    keys = _keys_from_lines(path, text) if data is None else _keys_from_mapping(path, data)
    if not keys:
        raise ConfigError(
            f"the API keys file {path} holds no key; a server without keys accepts every client"
        )
    return keys


def _keys_from_mapping(path: Path, data: Any) -> list[APIKey]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"the API keys file {path} must map each key to its tenant")
    keys = []
    for i, (key, entry) in enumerate(data.items(), start=1):
        if not isinstance(key, str):
            raise ConfigError(
                f"the API keys file {path}, key #{i}: not a string (quote it in YAML)"
            )
        if isinstance(entry, str):
            entry = {"tenant": entry}
        elif entry is None:
            entry = {}
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"the API keys file {path}, key #{i}: expected a tenant name or a mapping with "
                "tenant, priority, max_concurrent_requests, max_tokens_per_minute"
            )
        keys.append(_make_key(path, f"key #{i}", {**entry, "key": key}))
    return keys


def _keys_from_lines(path: Path, text: str) -> list[APIKey]:
    keys = []
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise ConfigError(f"the API keys file {path}, line {n}: expected 'key' or 'key tenant'")
        entry = {"key": fields[0], "tenant": fields[1] if len(fields) == 2 else None}
        keys.append(_make_key(path, f"line {n}", entry))
    return keys


def _make_key(path: Path, where: str, entry: Mapping[str, Any]) -> APIKey:
    try:
        return APIKey.model_validate(entry)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"the API keys file {path}, {where}: {problems}") from None


def _describe(error: Any) -> str:
    """A validation error without the input value (which may be the key)."""
    loc = ".".join(str(p) for p in error.get("loc", ()))
    if error.get("type") == "extra_forbidden":
        valid = ", ".join(f for f in APIKey.model_fields if f != "key")
        return f"unknown field {loc!r} (valid: {valid})"
    return f"{loc}: {error.get('msg', 'invalid value')}" if loc else str(error.get("msg"))


def api_keys_from(
    keys: Iterable[str] = (),
    keys_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> tuple[APIKey, ...]:
    """Keys given as ``--api-key`` values, in a keys file and in ``SAGELLM_API_KEY``.

    As vLLM reads ``VLLM_API_KEY``, the variable counts only when no key is given on the
    command line; the keys file adds its keys either way.
    """
    env = os.environ if environ is None else environ
    result: list[APIKey] = []
    given = list(keys)
    if not given and env.get("SAGELLM_API_KEY"):
        given = [env["SAGELLM_API_KEY"]]
    for i, value in enumerate(given, start=1):
        try:
            result.append(APIKey(key=SecretStr(value)))
        except ValidationError:
            raise ConfigError(
                f"--api-key #{i}: an API key must be a non-empty ASCII string without whitespace"
            ) from None
    if keys_file is not None:
        result.extend(load_api_keys_file(keys_file))
    return tuple(result)


def json_object(value: str | Mapping[str, Any], name: str, example: str) -> dict[str, Any]:
    """A JSON-object option (``--speculative-config``, ``--kv-transfer-config``) given as
    text or as a mapping, as a dict; ConfigError naming ``name`` and showing ``example``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{name} is not valid JSON ({exc}); write it like '{example}'"
            ) from exc
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a JSON object or a mapping")
    return dict(value)
