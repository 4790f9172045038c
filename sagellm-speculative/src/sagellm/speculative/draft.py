"""``draft`` and ``layer_skip``: a smaller model drafts, through the engine's own runtime.

:class:`DraftModelProposer` builds a second runtime of the target's runtime class (core's
``Runtime`` protocol) for the draft model: another checkpoint (``model``), a quantized or
pruned copy of the target (``runtime_options``, e.g. ``{"quantization": "int4"}``), or
the target with some of its layers left out (``layer_skip``, the self-speculative
Draft&Verify / SWIFT idea). The draft runtime gets a KV pool of its own (from the
``sagellm.kv_pool`` group) and the proposer keeps, per request, the tokens whose draft KV
is in it. Before each step it brings every request's draft KV up to its context (the
tokens accepted since the last step, one chunk per request), then decodes ``k`` tokens
greedily, all requests batched in each of those forward passes. Drafts are greedy, so
they are point masses for the verifier (``draft_probs`` None), which keeps sampled
outputs exact.

Rollback is by position: the next call keeps the draft KV of the longest common prefix of
what it computed and the request's new context; positions after it are overwritten when
recomputed. A request's blocks are freed when it finishes (``observe_finished``), and the
least recently seen requests are dropped when the draft pool runs short.

:class:`LayerSkipProposer` picks the layers to leave out by a calibration on the text
the package ships (:func:`calibrate_skip_layers`): one teacher-forced pass of the full
model over the text, then, greedily, the layer whose removal keeps the most top-1
agreement with it, until ``num_skip_layers`` are out (the agreement of each candidate set
measured by a teacher-forced pass of the skipped model).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from sagellm.core import registry
from sagellm.core.errors import ConfigError
from sagellm.core.types import (
    DraftRequest,
    ExecutionPlan,
    IRGraph,
    IRNode,
    IRNodeKind,
    SequenceChunk,
    SpeculativeDraft,
)

__all__ = [
    "DraftModelConfig",
    "DraftModelProposer",
    "LayerSkipConfig",
    "LayerSkipProposer",
    "calibrate_skip_layers",
    "calibration_token_ids",
]

logger = logging.getLogger(__name__)

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class DraftModelConfig(BaseModel):
    """A draft model run by a second runtime of the target's runtime class."""

    model_config = _FROZEN

    num_speculative_tokens: int = Field(4, ge=1, le=16)  # k
    # the draft runtime's model (None: the target's own, changed by runtime_options)
    model: str | None = None
    # fields of the draft runtime's config set over the target's (quantization, dtype, ...)
    runtime_options: dict[str, Any] = Field(default_factory=dict)
    kv_pool: str = "paged"  # implementation in the sagellm.kv_pool group
    num_blocks: int = Field(512, ge=2)  # blocks of the draft pool
    block_size: int = Field(16, ge=1)


class LayerSkipConfig(BaseModel):
    """The target itself with layers left out (self-speculation)."""

    model_config = _FROZEN

    num_speculative_tokens: int = Field(4, ge=1, le=16)  # k
    # layers to leave out; None: chosen by calibrate_skip_layers (num_skip_layers of them)
    skip_layers: tuple[int, ...] | None = None
    num_skip_layers: int = Field(8, ge=1)
    # the last layers are never candidates (their removal costs the most agreement)
    calibration_tokens: int = Field(256, ge=16)  # of the shipped text
    runtime_options: dict[str, Any] = Field(default_factory=dict)
    kv_pool: str = "paged"
    num_blocks: int = Field(512, ge=2)
    block_size: int = Field(16, ge=1)


def calibration_token_ids(tokenize: Any, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` tokens of the package's calibration text."""
    text = (resources.files("sagellm.speculative") / "data" / "calibration.txt").read_text(
        encoding="utf-8"
    )
    ids = list(tokenize(text))[:max_tokens]
    if len(ids) < 2:
        raise ConfigError("the calibration text gave fewer than two tokens")
    return ids


def _plan(chunks: Sequence[SequenceChunk], plan_id: int) -> ExecutionPlan:
    nodes = (IRNode(0, IRNodeKind.PREFILL_CHUNK, chunks=tuple(chunks)),)
    return ExecutionPlan(plan_id, IRGraph(nodes), tuple(c.request_id for c in chunks))


def _make_runtime(target: Any, model: str | None, options: dict[str, Any]) -> Any:
    """A runtime of ``target``'s class for the draft: its config with ``model`` and
    ``options`` set over the target's."""
    if target is None:
        raise ConfigError(
            "a model-based proposer runs its model through the engine's runtime: build it "
            "with runtime= (the engine does), or use ngram/suffix"
        )
    cls = type(target)
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        raise ConfigError(f"runtime {cls.__name__} has no config_class to build a draft from")
    base = getattr(target, "config", None)
    data = base.model_dump() if isinstance(base, BaseModel) else {}
    if model is not None:
        data["model"] = model
    unknown = sorted(set(options) - set(config_class.model_fields))
    if unknown:
        raise ConfigError(
            f"runtime_options {unknown} are not fields of {config_class.__name__}; "
            f"known: {', '.join(sorted(config_class.model_fields))}"
        )
    data.update(options)
    try:
        config = config_class.model_validate(data)
    except ValueError as exc:
        raise ConfigError(f"the draft runtime's config is invalid: {exc}") from exc
    return cls(config)


@dataclass
class _DraftState:
    """What the draft pool holds of one request."""

    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # tokens whose draft KV is in the pool


class DraftModelProposer:
    """Greedy drafts of a draft model (implements ``sagellm.core.protocols.Proposer``)."""

    config_class: ClassVar[type[BaseModel]] = DraftModelConfig

    def __init__(
        self,
        config: DraftModelConfig | None = None,
        *,
        runtime: Any = None,
        draft_runtime: Any = None,
        kv_pool: Any = None,
        **_context: Any,
    ) -> None:
        self.config = config or DraftModelConfig()
        cfg: Any = self.config
        self.runtime = (
            draft_runtime
            if draft_runtime is not None
            else _make_runtime(runtime, getattr(cfg, "model", None), self._runtime_options(runtime))
        )
        schema = self.runtime.kv_cache_schema(cfg.block_size)
        self.pool = (
            kv_pool
            if kv_pool is not None
            else registry.load(
                "kv_pool",
                cfg.kv_pool,
                {"num_blocks": cfg.num_blocks},
                schema=schema,
                device=getattr(getattr(self.runtime, "config", None), "device", "cpu"),
            )
        )
        self.runtime.bind_kv_pool(self.pool)
        self.block_size = int(self.pool.schema.block_size)
        self.max_model_len = int(self.runtime.capabilities().max_model_len)
        self._states: OrderedDict[str, _DraftState] = OrderedDict()
        self._plan_id = 0

    def _runtime_options(self, target: Any) -> dict[str, Any]:
        return dict(self.config.runtime_options)  # type: ignore[attr-defined]

    @property
    def num_speculative_tokens(self) -> int:
        return int(self.config.num_speculative_tokens)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ KV bookkeeping

    def _release(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None and state.blocks:
            self.pool.free(state.blocks)

    def _ensure_blocks(
        self, request_id: str, state: _DraftState, num_positions: int, keep: set[str]
    ) -> bool:
        """Blocks for ``num_positions`` positions; drops the least recently seen requests
        (never those in ``keep``: this step's) when the pool is short; False when even
        that does not make room."""
        need = -(-num_positions // self.block_size) - len(state.blocks)
        if need <= 0:
            return True
        while not self.pool.can_allocate(need):
            victim = next((r for r in self._states if r != request_id and r not in keep), None)
            if victim is None:
                return False
            self._release(victim)
        got = self.pool.allocate(need)
        if got is None:
            return False
        state.blocks.extend(got)
        return True

    def _step(self, chunks: list[SequenceChunk]) -> list[int]:
        """Run ``chunks`` (each sampling its last position); the greedy token of each."""
        self._plan_id += 1
        out = self.runtime.execute(_plan(chunks, self._plan_id))
        return [int(t) for t in out.logits.argmax(dim=-1).tolist()]

    # ------------------------------------------------------------------ Proposer

    def propose(self, requests: Sequence[DraftRequest]) -> list[SpeculativeDraft]:
        k_max = self.num_speculative_tokens
        drafts: dict[str, list[int]] = {r.request_id: [] for r in requests}
        live: list[tuple[DraftRequest, _DraftState, int]] = []  # request, state, k
        chunks: list[SequenceChunk] = []
        stepping: set[str] = set()  # requests with a chunk in this step
        for req in requests:
            context = req.token_ids
            k = min(req.num_tokens, k_max, self.max_model_len - len(context))
            if k <= 0 or not context:
                continue
            state = self._states.pop(req.request_id, None) or _DraftState()
            self._states[req.request_id] = state  # most recently seen last
            # keep the draft KV of the common prefix, never the last context token's
            common = 0
            limit = min(len(state.tokens), len(context) - 1)
            while common < limit and state.tokens[common] == context[common]:
                common += 1
            state.tokens = state.tokens[:common]
            if not self._ensure_blocks(req.request_id, state, len(context) + k - 1, stepping):
                self._release(req.request_id)
                continue
            new = context[common:]
            chunks.append(
                SequenceChunk(req.request_id, tuple(new), common, tuple(state.blocks), sample=True)
            )
            state.tokens.extend(new)
            live.append((req, state, k))
            stepping.add(req.request_id)
        if not chunks:
            return [SpeculativeDraft(r.request_id, ()) for r in requests]
        tokens = self._step(chunks)
        for (req, _state, _k), tok in zip(live, tokens):
            drafts[req.request_id].append(tok)
        # k - 1 more greedy steps, all requests that still need drafts in one batch each
        for j in range(1, k_max):
            chunks = []
            rows = []
            for req, state, k in live:
                if j >= k:
                    continue
                last = drafts[req.request_id][-1]
                chunks.append(
                    SequenceChunk(
                        req.request_id,
                        (last,),
                        len(state.tokens),
                        tuple(state.blocks),
                        sample=True,
                    )
                )
                state.tokens.append(last)
                rows.append(req.request_id)
            if not chunks:
                break
            for rid, tok in zip(rows, self._step(chunks)):
                drafts[rid].append(tok)
        return [SpeculativeDraft(r.request_id, tuple(drafts[r.request_id])) for r in requests]

    def observe_finished(
        self, request_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int]
    ) -> None:
        self._release(request_id)

    def close(self) -> None:
        """Free every block the draft pool holds."""
        for rid in list(self._states):
            self._release(rid)


def _teacher_forced_top1(runtime: Any, pool: Any, tokens: Sequence[int]) -> list[int]:
    """The runtime's greedy next token at every position of ``tokens`` (one pass)."""
    block_size = int(pool.schema.block_size)
    blocks = pool.allocate(-(-len(tokens) // block_size))
    if blocks is None:
        raise ConfigError(
            f"the draft pool cannot hold the {len(tokens)} calibration tokens; raise num_blocks"
        )
    try:
        chunk = SequenceChunk(
            "calibration", tuple(tokens), 0, tuple(blocks), sample=True, num_logits=len(tokens)
        )
        out = runtime.execute(_plan([chunk], 0))
        return [int(t) for t in out.logits.argmax(dim=-1).tolist()]
    finally:
        pool.free(blocks)


def calibrate_skip_layers(
    runtime: Any, make_pool: Any, num_skip: int, tokens: Sequence[int]
) -> tuple[tuple[int, ...], float]:
    """``(layers to skip, top-1 agreement with the full model)`` on ``tokens``.

    ``runtime`` is loaded with every layer and has ``set_skip_layers(layers)`` (the native
    runtime does); ``make_pool(runtime)`` returns a pool bound to it. First the full
    model's teacher-forced greedy tokens; then each layer but the first and last is left
    out alone and scored by the top-1 agreement of the rest with them; the ``num_skip``
    layers whose removal costs the least agreement are chosen (single-layer ablation, one
    forward pass per layer) and the chosen set is scored together. The runtime is left
    with the chosen layers skipped and its pool unbound.
    """
    runtime.set_skip_layers(())
    num_layers = int(runtime.kv_cache_schema(16).num_layers)
    if not 1 <= num_skip <= num_layers - 2:
        raise ConfigError(
            f"num_skip_layers={num_skip}: give 1 to {num_layers - 2} (the first and last "
            "layers are kept)"
        )

    def top1(skip: tuple[int, ...]) -> list[int]:
        runtime.set_skip_layers(skip)
        return _teacher_forced_top1(runtime, make_pool(runtime), tokens)

    reference = top1(())

    def agreement(skip: tuple[int, ...]) -> float:
        got = top1(skip)
        return sum(a == b for a, b in zip(got, reference)) / len(reference)

    scores = {layer: agreement((layer,)) for layer in range(1, num_layers - 1)}
    ranked = sorted(scores, key=lambda layer: (-scores[layer], layer))
    chosen = tuple(sorted(ranked[:num_skip]))
    together = agreement(chosen)
    logger.info("layer_skip calibration: skip %s, top-1 agreement %.3f", chosen, together)
    return chosen, together


class LayerSkipProposer(DraftModelProposer):
    """The target without some of its layers drafts (``layer_skip``).

    The draft runtime is a second runtime of the target's class with ``skip_layers`` set
    (a field its config must have: the native runtime's does). Without ``skip_layers`` in
    the config the layers are chosen by :func:`calibrate_skip_layers` on the shipped text
    when the proposer is built (``calibration_agreement`` is then the chosen set's top-1
    agreement with the full model); the calibrated runtime becomes the draft runtime.
    """

    config_class: ClassVar[type[BaseModel]] = LayerSkipConfig

    def __init__(
        self, config: LayerSkipConfig | None = None, *, runtime: Any = None, **context: Any
    ) -> None:
        cfg = config or LayerSkipConfig()
        self.calibration_agreement: float | None = None
        self._skip = cfg.skip_layers
        if runtime is not None:
            fields = getattr(type(runtime), "config_class", BaseModel).model_fields
            if "skip_layers" not in fields:
                raise ConfigError(
                    "layer_skip needs a runtime whose config can skip layers (skip_layers); "
                    f"{type(runtime).__name__} cannot"
                )
        if self._skip is None and runtime is not None and "draft_runtime" not in context:
            context["draft_runtime"] = self._calibrated(cfg, runtime)
        super().__init__(cfg, runtime=runtime, **context)  # type: ignore[arg-type]

    def _runtime_options(self, target: Any) -> dict[str, Any]:
        options = dict(self.config.runtime_options)  # type: ignore[attr-defined]
        options["skip_layers"] = tuple(self._skip or ())
        return options

    @property
    def skip_layers(self) -> tuple[int, ...]:
        return tuple(self._skip or ())

    def _calibrated(self, cfg: LayerSkipConfig, runtime: Any) -> Any:
        """A draft runtime with the calibrated layers left out (and their weights freed)."""
        tokenize = getattr(runtime, "tokenize", None)
        if tokenize is None:
            raise ConfigError(
                "layer_skip calibration needs the runtime's tokenize(); give skip_layers"
            )
        tokens = calibration_token_ids(tokenize, cfg.calibration_tokens)
        draft = _make_runtime(runtime, None, {**cfg.runtime_options, "skip_layers": ()})
        if not hasattr(draft, "set_skip_layers"):
            raise ConfigError(
                f"{type(draft).__name__} cannot change its skipped layers after loading, "
                "which the calibration needs; give skip_layers"
            )
        blocks = -(-len(tokens) // cfg.block_size) + 1

        def make_pool(rt: Any) -> Any:
            pool = registry.load(
                "kv_pool",
                cfg.kv_pool,
                {"num_blocks": blocks},
                schema=rt.kv_cache_schema(cfg.block_size),
            )
            rt.bind_kv_pool(pool)
            return pool

        self._skip, self.calibration_agreement = calibrate_skip_layers(
            draft, make_pool, cfg.num_skip_layers, tokens
        )
        draft.set_skip_layers(self._skip)
        if hasattr(draft, "drop_skipped_layers"):
            draft.drop_skipped_layers()
        return draft
