"""Structured outputs: token masks from a grammar, applied while sampling.

A request may constrain its output to a JSON schema, any JSON object, a regular
expression, one of a list of strings, an EBNF grammar or an xgrammar structural tag
(:class:`StructuredOutput`). The engine compiles each distinct constraint once with
xgrammar's ``GrammarCompiler`` (compiled grammars are cached by constraint), keeps one
``GrammarMatcher`` per sequence (:class:`GrammarState`), and before each sampling step
fills a token bitmask for the constrained rows only and sets the disallowed logits to
``-inf`` (:func:`apply_grammar_masks`). Every sampled token is accepted into its matcher
when the engine appends it; a matcher that reaches its end finishes the sequence.

Anchor: vLLM v1's structured-output manager with the xgrammar backend (compile per
request key, bitmask per step, ``accept_tokens`` after sampling) and SGLang's grammar
backends. Differences: compilation is synchronous at admission (an uncompilable schema is
refused before anything is queued, never a request that hangs); the mask is applied to
the logits before logprobs are taken, so reported logprobs are those of the constrained
distribution; JSON is generated compact (no free whitespace: a model cannot spend its
budget on blanks); speculative decoding skips constrained requests instead of verifying
drafts against the matcher.

Offline use::

    from sagellm.engine import LLM
    from sagellm.engine.structured import SamplingParams, StructuredOutput

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    params = SamplingParams(max_tokens=64, structured_output=StructuredOutput(json=schema))
    print(LLM(model="smollm2-135m").generate(["Name a city as JSON: "], params)[0].outputs[0].text)

xgrammar is an optional dependency (``pip install 'sagellm-engine[structured]'``); it is
imported on first use.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sagellm.core.errors import InvalidRequestError
from sagellm.core.types import SamplingParams as CoreSamplingParams

if TYPE_CHECKING:
    import torch

__all__ = [
    "INSTALL_HINT",
    "GrammarState",
    "SamplingParams",
    "StructuredOutput",
    "StructuredOutputs",
    "apply_grammar_masks",
    "import_xgrammar",
]

#: What to install for structured outputs and tool choices that need a grammar.
INSTALL_HINT = "pip install 'sagellm-engine[structured]'"

# StructuredOutput's fields, one per kind of constraint.
_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")

#: Compiled grammars kept per engine (least recently used dropped first).
_CACHE_SIZE = 256

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; callers see the rest.
_XGRAMMAR_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+?:\d+:\s*")


def import_xgrammar() -> Any:
    """The xgrammar module; InvalidRequestError naming the extra when it is missing."""
    try:
        import xgrammar
    except ImportError:
        raise InvalidRequestError(
            "structured outputs (response_format json_object/json_schema, guided_* fields, "
            f"tool_choice 'required' or a named function) need xgrammar: {INSTALL_HINT}"
        ) from None
    return xgrammar


def _xgrammar_message(exc: BaseException) -> str:
    lines = [_XGRAMMAR_PREFIX.sub("", line) for line in str(exc).strip().splitlines()]
    return " ".join(line.strip() for line in lines if line.strip()) or type(exc).__name__


class StructuredOutput(BaseModel):
    """One output constraint; exactly one field is set.

    Field names follow vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``,
    ``grammar``, ``json_object``, ``structural_tag``). A JSON schema given as a mapping is
    kept as compact JSON text (property order kept: it is the order of the output), so
    equal schemas share one compiled grammar.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    json_schema: str | None = Field(None, alias="json")  # a JSON schema (text)
    json_object: bool = False  # any JSON object
    regex: str | None = None  # the whole output matches this regular expression
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # an EBNF grammar (root rule: root)
    structural_tag: str | None = None  # an xgrammar structural tag (JSON text)

    @field_validator("json_schema", "structural_tag", mode="before")
    @classmethod
    def _as_json_text(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
        if isinstance(value, (dict, list, bool)):
            return json.dumps(value, separators=(",", ":"))  # key order is meaningful
        raise ValueError("a JSON schema is a JSON object (a mapping or its JSON text)")

    @field_validator("choice", mode="before")
    @classmethod
    def _check_choice(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError("choice is a non-empty list of strings")
        if not all(isinstance(c, str) and c for c in value):
            raise ValueError("every choice is a non-empty string")
        return tuple(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutput:
        set_ = [name for name in _KINDS if getattr(self, name) not in (None, False)]
        if len(set_) != 1:
            names = ", ".join("json" if n == "json_schema" else n for n in _KINDS)
            got = ", ".join(set_) or "none"
            raise ValueError(f"give exactly one of {names} (got: {got})")
        return self

    @property
    def kind(self) -> str:
        """Which constraint this is: ``json``, ``json_object``, ``regex``, ``choice``, ..."""
        for name in _KINDS:
            if getattr(self, name) not in (None, False):
                return "json" if name == "json_schema" else name
        raise AssertionError("validated to hold exactly one constraint")

    @property
    def key(self) -> tuple[str, str]:
        """Cache key of the compiled grammar."""
        kind = self.kind
        value = getattr(self, "json_schema" if kind == "json" else kind)
        return kind, json.dumps(value) if isinstance(value, tuple) else str(value)


class SamplingParams(CoreSamplingParams):
    """:class:`sagellm.core.types.SamplingParams` with an output constraint.

    ``structured_output`` constrains every completion of the request (each of the ``n``
    has its own matcher). Anything that takes the core SamplingParams takes this one.
    """

    structured_output: StructuredOutput | None = None  # None: unconstrained


def structured_output_of(sampling: CoreSamplingParams) -> StructuredOutput | None:
    """The constraint a SamplingParams carries (None for the core type)."""
    return getattr(sampling, "structured_output", None)


class GrammarState:
    """One sequence's matcher: which tokens may come next, and what has been accepted.

    The engine calls :meth:`accept` once per token appended to the sequence (never for
    tokens recomputed after a preemption), so the matcher advances exactly once per
    output token.
    """

    __slots__ = ("_matcher", "num_accepted", "terminated")

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher
        self.num_accepted = 0  # output tokens accepted so far
        self.terminated = False  # the grammar is complete and its stop token was taken

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row ``row`` of ``bitmask``."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance by ``token_id``; False (state unchanged) when the grammar forbids it."""
        if self.terminated or not self._matcher.accept_token(int(token_id)):
            return False
        self.num_accepted += 1
        self.terminated = bool(self._matcher.is_terminated())
        return True


class StructuredOutputs:
    """Compiles constraints for one tokenizer and hands out per-sequence matchers.

    ``vocab_size`` is the width of the model's logits (it may exceed the tokenizer's
    length); ``stop_token_ids`` end a completed grammar (the engine's end-of-sequence
    ids). xgrammar is imported and the TokenizerInfo built on the first constrained
    request.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0  # grammars compiled (cache misses)

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            xgr = import_xgrammar()
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "structured outputs need the model's tokenizer; this engine has none"
                )
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer,
                vocab_size=self.vocab_size,
                stop_token_ids=self.stop_token_ids or None,
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar of ``spec`` (cached); InvalidRequestError saying why not."""
        key = spec.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiler = self._get_compiler()
        try:
            compiled = self._compile(compiler, spec)
        except InvalidRequestError:
            raise
        except Exception as exc:  # xgrammar reports bad schemas/regexes/grammars as errors
            raise InvalidRequestError(
                f"the {spec.kind} constraint cannot be compiled: {_xgrammar_message(exc)}"
            ) from None
        with self._lock:
            self._cache[key] = compiled
            self.num_compiled += 1
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def _compile(compiler: Any, spec: StructuredOutput) -> Any:
        kind = spec.kind
        if kind == "json":
            assert spec.json_schema is not None
            try:
                schema = json.loads(spec.json_schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError("a JSON schema is a JSON object")
            return compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, strict_mode=True
            )
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(spec.regex)
        if kind == "choice":
            assert spec.choice is not None
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            return compiler.compile_grammar(f"root ::= {alternatives}")
        if kind == "grammar":
            return compiler.compile_grammar(spec.grammar)
        return compiler.compile_structural_tag(spec.structural_tag)

    def new_state(self, spec: StructuredOutput) -> GrammarState:
        """A fresh matcher for one sequence constrained by ``spec``."""
        xgr = import_xgrammar()
        return GrammarState(xgr.GrammarMatcher(self.compile(spec)))


def apply_grammar_masks(
    logits: torch.Tensor, rows: Sequence[int], states: Sequence[GrammarState]
) -> torch.Tensor:
    """``logits`` with the tokens each constrained row may not take set to ``-inf``.

    Only the rows in ``rows`` (one state each) are masked; the result is a new tensor and
    ``logits`` is left as it was. A row whose grammar allows nothing (it cannot happen
    for a live matcher) keeps its logits rather than becoming all ``-inf``.
    """
    import torch

    xgr = import_xgrammar()
    num, vocab = len(rows), logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(num, vocab)
    for i, state in enumerate(states):
        state.fill_bitmask(bitmask, i)
    index = torch.as_tensor(list(rows), dtype=torch.long, device=logits.device)
    sub = logits.index_select(0, index).float()
    xgr.apply_token_bitmask_inplace(sub, bitmask.to(sub.device), vocab_size=vocab)
    dead = torch.isneginf(sub).all(dim=-1)
    if bool(dead.any()):
        sub[dead] = logits.index_select(0, index)[dead].float()
    out = logits.clone()
    out.index_copy_(0, index, sub.to(out.dtype))
    return out
