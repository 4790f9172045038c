"""Offline Python API: ``LLM(model=...).generate(prompts, sampling)``.

The prompts are all queued at once and the engine steps until every one has finished,
so the scheduler batches them (continuous batching); results come back in input order.
:meth:`LLM.embed` is the offline ``/v1/embeddings``: one pooled final-norm hidden state
per prompt (``outputs.embedding``, vLLM's shape), computed in the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sagellm.core.config import EngineConfig
from sagellm.core.errors import InvalidRequestError, RequestAbortedError
from sagellm.core.types import RequestKind, RequestOutput, SamplingParams
from sagellm.engine.args import make_engine_config
from sagellm.engine.config import BuildOptions
from sagellm.engine.cot import CoTOptions
from sagellm.engine.llm_engine import EngineRequestOutput, LLMEngine, PoolingParams, Prompt

__all__ = ["LLM", "EmbeddingOutput", "EmbeddingRequestOutput", "Message", "apply_chat_template"]

Message = Mapping[str, Any]
#: Text, token ids, or a vLLM-style prompt dict ({"prompt": ...} / {"prompt_token_ids": ...}).
PromptInput = Prompt | Mapping[str, Any]

#: Consecutive steps without scheduled work after which generate() gives up (a scheduler
#: that can admit nothing while requests wait would otherwise spin forever).
_MAX_IDLE_STEPS = 1000


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise InvalidRequestError(
                    "only text content parts ({'type': 'text', 'text': ...}) are supported"
                )
        return "".join(parts)
    if content is None:
        return ""
    raise InvalidRequestError("message content must be a string or a list of text parts")


@dataclass(frozen=True, slots=True)
class EmbeddingOutput:
    """The vector of one embedded prompt."""

    embedding: list[float]  # pooled final-norm hidden state, hidden_size values


@dataclass(frozen=True, slots=True)
class EmbeddingRequestOutput:
    """What :meth:`LLM.embed` returns per prompt (vLLM's ``EmbeddingRequestOutput``)."""

    request_id: str
    prompt: str | None  # the text, None for token ids
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


def _pooling_params(pooling: Any) -> PoolingParams:
    """``pooling`` of :meth:`LLM.embed` as PoolingParams."""
    if pooling is None:
        return PoolingParams()
    if isinstance(pooling, PoolingParams):
        if pooling.pooling not in ("last", "mean"):
            raise InvalidRequestError(
                f"PoolingParams.pooling must be 'last' or 'mean'; got {pooling.pooling!r}"
            )
        return pooling
    if pooling == "last" or pooling == "mean":
        return PoolingParams(pooling)
    raise InvalidRequestError(f"pooling must be 'last', 'mean' or a PoolingParams; got {pooling!r}")


_PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "cache_salt"})

#: Message keys kept for the chat template besides role and content.
_TOOL_MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name")


def _prompt_batch(
    prompts: PromptInput | Sequence[PromptInput], cache_salt: str
) -> tuple[list[Prompt], list[str]]:
    """Prompts as text or token ids, and each one's cache salt."""
    if isinstance(prompts, (str, Mapping)) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
    ):
        items: list[Any] = [prompts]
    elif isinstance(prompts, Iterable):
        items = list(prompts)
    else:
        raise InvalidRequestError(
            "prompts must be a text, a list of token ids, a prompt dict or a list of them; "
            f"got {type(prompts).__name__}"
        )
    batch: list[Prompt] = []
    salts: list[str] = []
    for item in items:
        if not isinstance(item, Mapping):
            batch.append(item)
            salts.append(cache_salt)
            continue
        unknown = set(item) - _PROMPT_KEYS
        if unknown:
            raise InvalidRequestError(
                f"prompt dict has unknown keys {sorted(unknown)}; it takes 'prompt' (text) "
                "or 'prompt_token_ids', and optionally 'cache_salt'"
            )
        if ("prompt" in item) == ("prompt_token_ids" in item):
            raise InvalidRequestError(
                "a prompt dict holds exactly one of 'prompt' (text) and 'prompt_token_ids'"
            )
        if "prompt" in item:
            if not isinstance(item["prompt"], str):
                raise InvalidRequestError("'prompt' of a prompt dict must be a string")
            batch.append(item["prompt"])
        else:
            batch.append(list(item["prompt_token_ids"]))
        salt = item.get("cache_salt", cache_salt)
        if not isinstance(salt, str):
            raise InvalidRequestError("'cache_salt' of a prompt dict must be a string")
        salts.append(salt)
    return batch, salts


def apply_chat_template(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> str:
    """The prompt text of a conversation under the tokenizer's chat template."""
    if tokenizer is None:
        raise InvalidRequestError("chat needs a tokenizer; this engine has none")
    if not messages:
        raise InvalidRequestError("messages is empty: a conversation needs at least one message")
    conv = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise InvalidRequestError(f"messages[{i}] needs a 'role' and a 'content'")
        message = {"role": str(m["role"]), "content": _message_text(m.get("content"))}
        for key in _TOOL_MESSAGE_KEYS:  # tool-aware templates read these
            if m.get(key) is not None:
                message[key] = m[key]
        conv.append(message)
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("the model's tokenizer has no chat template; use completions")
    text: str = tokenizer.apply_chat_template(
        conv,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
        **template_kwargs,
    )
    return text


class LLM:
    """Batch generation with a locally built engine.

    Usage::

        from sagellm.engine import LLM
        from sagellm.core.types import SamplingParams

        llm = LLM(model="smollm2-135m")
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))
        print(out[0].outputs[0].text)
        print(llm.chat([{"role": "user", "content": "Hi!"}])[0].outputs[0].text)

    Keyword options are those of :func:`sagellm.engine.args.make_engine_config`
    (``dtype``, ``num_threads``, ``block_size``, ``max_num_seqs``, ``kv_pool``, ...).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        config: EngineConfig | str | os.PathLike[str] | None = None,
        build_options: BuildOptions | None = None,
        **engine_options: Any,
    ) -> None:
        if isinstance(config, EngineConfig):
            if engine_options:
                raise InvalidRequestError(
                    "pass either an EngineConfig or keyword options, not both"
                )
            if model is not None:
                config = config.model_copy(update={"model": model})
            options = build_options or BuildOptions()
        else:
            config, options = make_engine_config(config, model=model, **engine_options)
            options = build_options or options
        self.engine = LLMEngine.from_config(config, options)
        self._counter = 0

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer."""
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        kind: RequestKind = RequestKind.COMPLETION,
        add_special_tokens: bool = True,
        tenant: str = "",
        cache_salt: str = "",
        cot: CoTOptions | Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs in input order.

        ``cot`` (:class:`~sagellm.engine.cot.CoTOptions` or its dict) applies to every
        prompt: ``{"self_consistency": {"n": 16, "method": "esc", "window": 4}}`` draws up to
        16 samples in windows of 4 and stops once a window agrees (the vote is in
        ``RequestOutput.consistency``); ``{"early_exit": {...}}`` ends reasoning early.

        A prompt is text, token ids, or one of vLLM's prompt dicts: ``{"prompt": text}``
        or ``{"prompt_token_ids": [...]}``, either optionally with its own
        ``"cache_salt"``. ``tenant`` and ``cache_salt`` isolate the prefix cache: a prompt
        reuses cached prefixes only of requests with the same tenant and salt (``tenant``
        also owns the KV quota).
        """
        batch, salts = _prompt_batch(prompts, cache_salt)
        if isinstance(sampling, Sequence):
            if len(sampling) != len(batch):
                raise InvalidRequestError(
                    f"{len(sampling)} sampling params for {len(batch)} prompts: give one or one each"
                )
            params = list(sampling)
        else:
            params = [sampling or SamplingParams()] * len(batch)
        options = cot if cot is None or isinstance(cot, CoTOptions) else CoTOptions(**cot)
        return self._run(batch, params, use_tqdm, kind, add_special_tokens, tenant, salts, options)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tenant: str = "",
        cache_salt: str = "",
        cot: CoTOptions | Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation or a list of them with the tokenizer's chat template.

        ``tenant``, ``cache_salt`` and ``cot``: as in :meth:`generate`.
        """
        if not messages:
            raise InvalidRequestError(
                "messages is empty: a conversation needs at least one message"
            )
        first = messages[0]
        conversations: list[Sequence[Message]]
        if isinstance(first, Mapping):
            conversations = [messages]  # type: ignore[list-item]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        prompts = [
            apply_chat_template(
                self.tokenizer,
                conv,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                **dict(chat_template_kwargs or {}),
            )
            for conv in conversations
        ]
        return self.generate(
            prompts,
            sampling,
            use_tqdm=use_tqdm,
            kind=RequestKind.CHAT,
            add_special_tokens=False,
            tenant=tenant,
            cache_salt=cache_salt,
            cot=cot,
        )

    def embed(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        pooling: PoolingParams | Literal["last", "mean"] | None = None,
        *,
        use_tqdm: bool = False,
        add_special_tokens: bool = True,
        tenant: str = "",
    ) -> list[EmbeddingRequestOutput]:
        """Embed every prompt; one result per prompt, in input order.

        The offline ``/v1/embeddings``: each vector (``outputs.embedding``, ``hidden_size``
        floats) is the model's final-norm hidden state pooled over the prompt, the last
        token's or the mean of all (``pooling``: ``"last"``, ``"mean"`` or a
        :class:`~sagellm.engine.llm_engine.PoolingParams`; default: the last token's),
        scaled to unit L2 norm unless ``PoolingParams(normalize=False)``. Prompts are
        text, token ids or prompt dicts, as in :meth:`generate`; they are batched
        together, and an embedding request never reads or fills the prefix cache.

        Raises InvalidRequestError for an unknown pooling and for a prompt the engine
        refuses (empty, too long for the context, token ids outside the vocabulary);
        nothing is embedded then. RequestAbortedError when the scheduler's admission
        control rejects a prompt.
        """
        params = _pooling_params(pooling)
        batch, _ = _prompt_batch(prompts, "")
        outs = self._run(
            batch,
            [None] * len(batch),
            use_tqdm,
            RequestKind.ONE_OFF,
            add_special_tokens,
            tenant,
            [""] * len(batch),
            desc="embedding",
            pooling=params,
        )
        results = []
        for i, out in enumerate(outs):
            vec = out.embedding if isinstance(out, EngineRequestOutput) else None
            if vec is None:  # the only other end of an embedding request
                raise RequestAbortedError(
                    f"prompt {i} was rejected by the scheduler's admission control (its "
                    "waiting queue is full): embed fewer prompts at once or raise the "
                    "scheduler's max_waiting / max_queue_tokens"
                )
            results.append(
                EmbeddingRequestOutput(
                    request_id=out.request_id,
                    prompt=out.prompt,
                    prompt_token_ids=list(out.prompt_token_ids),
                    outputs=EmbeddingOutput(list(vec)),
                )
            )
        return results

    # ------------------------------------------------------------------ helpers

    def _run(
        self,
        prompts: list[Prompt],
        params: Sequence[SamplingParams | None],
        use_tqdm: bool,
        kind: RequestKind,
        add_special_tokens: bool,
        tenant: str,
        cache_salts: list[str],
        cot: CoTOptions | None = None,
        *,
        desc: str = "generating",
        **request_kwargs: Any,
    ) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for prompt, p, cache_salt in zip(prompts, params, cache_salts):
                rid = f"llm-{self._counter}"
                self._counter += 1
                engine.add_request(
                    rid,
                    prompt,
                    p,
                    kind=kind,
                    add_special_tokens=add_special_tokens,
                    tenant=tenant,
                    cache_salt=cache_salt,
                    cot=cot,
                    **request_kwargs,
                )
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)
            raise
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc=desc, unit="req")
        idle = 0
        try:
            while engine.has_unfinished_requests():
                outputs = engine.step(unfinished_outputs=False)
                idle = 0 if engine.last_step_num_tokens else idle + 1
                if idle > _MAX_IDLE_STEPS:
                    raise RuntimeError(
                        f"the scheduler scheduled nothing for {_MAX_IDLE_STEPS} steps while "
                        f"{engine.get_num_unfinished_requests()} requests wait; the KV pool is "
                        "probably too small for them"
                    )
                for out in outputs:
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request(ids)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]
