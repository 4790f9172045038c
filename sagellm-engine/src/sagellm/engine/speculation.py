"""Speculative decoding in the engine: proposing before a step, verifying after it.

The proposer (group ``sagellm.speculative``, chosen by ``speculative_config["method"]``)
drafts up to k tokens for each decoding request before the step is scheduled; the
scheduler extends that request's decode chunk by the drafts within the step's token
budget; the runtime returns k + 1 logit rows for the chunk; :meth:`SpeculativeDecoder.verify`
keeps the drafts the target agrees with plus one token of its own, by the exact rule:
greedy rows keep drafts while they equal the argmax (outputs identical to decoding
without speculation), sampled rows accept draft ``x`` with probability ``p(x)`` (drafts are
point masses, or ``p(x)/q(x)`` when the proposer gives its distribution ``q``) and draw
from the residual at the first rejection (Leviathan et al.; Chen et al.), so sampled
outputs keep the target's distribution. The scheduler rolls back KV of rejected drafts.

Speculation switches itself off while more than ``disable_by_batch_size`` requests run
(verification then costs more than it saves) and for ``disabled_steps`` steps when the
acceptance rate over the last ``acceptance_window`` drafts is below
``min_acceptance_rate``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sagellm.core import registry
from sagellm.core.errors import ConfigError
from sagellm.core.types import DraftRequest, SpeculativeDraft
from sagellm.engine.config import json_object
from sagellm.engine.sampler import Sampler, SamplingRow, mix_seed

__all__ = ["SpeculativeDecoder", "SpeculativeSettings", "SpeculativeStats"]

_GREEDY_EPS = 1e-5
# salt of the verifier's random stream, so it never repeats the sampler's own draws
_VERIFY_SALT = 0x5EC0_DEC0


class SpeculativeSettings(BaseModel):
    """``speculative_config`` as vLLM spells it; keys not listed go to the proposer."""

    model_config = ConfigDict(frozen=True, extra="allow")

    method: str  # proposer name in the sagellm.speculative group: ngram, suffix, ...
    num_speculative_tokens: int = Field(5, ge=1, le=32)  # k
    # No drafts while this many requests run: a CPU step is compute-bound at large batches,
    # where verifying k + 1 positions per request costs more than it saves (None: never).
    disable_by_batch_size: int | None = Field(8, ge=1)
    # Pause drafting when fewer than this fraction of the last ``acceptance_window`` draft
    # tokens were accepted (0: never pause), for ``disabled_steps`` steps.
    min_acceptance_rate: float = Field(0.2, ge=0.0, le=1.0)
    acceptance_window: int = Field(64, ge=1)
    disabled_steps: int = Field(128, ge=1)

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | SpeculativeSettings) -> SpeculativeSettings:
        """From a JSON string (``--speculative-config``) or a mapping; ConfigError if bad."""
        if isinstance(value, SpeculativeSettings):
            return value
        value = json_object(
            value, "speculative_config", '{"method": "ngram", "num_speculative_tokens": 5}'
        )
        if "method" not in value:
            raise ConfigError(
                "speculative_config needs a 'method' naming a proposer (ngram, suffix, ...)"
            )
        try:
            return cls.model_validate(dict(value))
        except ValidationError as exc:
            raise ConfigError(f"bad speculative_config: {exc}") from exc

    def proposer_options(self) -> dict[str, Any]:
        """Options for the proposer's own config (k and the keys the engine does not use)."""
        out = dict(self.model_extra or {})
        out["num_speculative_tokens"] = self.num_speculative_tokens
        return out


@dataclass(slots=True)
class SpeculativeStats:
    """Counters since the previous ``make_stats()``."""

    num_drafts: int = 0  # verification chunks (requests that had drafts in a step)
    num_draft_tokens: int = 0  # draft tokens proposed and verified
    num_accepted_tokens: int = 0  # draft tokens accepted
    num_emitted_tokens: int = 0  # tokens those chunks produced (accepted + one each)
    num_disabled_steps: int = 0  # steps run without drafting because it was switched off

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when none was proposed)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification chunk (1 + accepted drafts on average)."""
        return self.num_emitted_tokens / self.num_drafts if self.num_drafts else 0.0


class SpeculativeDecoder:
    """The engine's side of speculation: the proposer, the switch-off rules, the verifier."""

    def __init__(self, settings: SpeculativeSettings, *, runtime: Any = None) -> None:
        self.settings = settings
        self.proposer = registry.load(
            "speculative", settings.method, settings.proposer_options(), runtime=runtime
        )
        self._window: deque[tuple[int, int]] = deque()  # (proposed, accepted) per chunk
        self._window_drafts = 0
        self._window_accepted = 0
        self._paused_steps = 0
        self._stats = SpeculativeStats()
        self.total = SpeculativeStats()  # since construction (never reset)

    # ------------------------------------------------------------------ proposing

    def active(self, num_running: int) -> bool:
        """Whether this step drafts at all (counts a switched-off step)."""
        s = self.settings
        if self._paused_steps > 0:
            self._paused_steps -= 1
            self._count(num_disabled_steps=1)
            return False
        if s.disable_by_batch_size is not None and num_running >= s.disable_by_batch_size:
            self._count(num_disabled_steps=1)
            return False
        return True

    def propose(self, requests: Sequence[DraftRequest]) -> list[SpeculativeDraft]:
        return self.proposer.propose([r for r in requests if r.num_tokens > 0])

    def observe_finished(
        self, request_id: str, prompt: Sequence[int], output: Sequence[int]
    ) -> None:
        self.proposer.observe_finished(request_id, prompt, output)

    # ------------------------------------------------------------------ verifying

    def verify(
        self,
        sampler: Sampler,
        logits: torch.Tensor,
        row: SamplingRow,
        drafts: Sequence[int],
        draft_probs: torch.Tensor | None = None,
    ) -> list[int]:
        """Tokens emitted for one request from its ``k + 1`` logit rows (1 to k + 1)."""
        p = row.params
        k = len(drafts)
        plain = p.temperature < _GREEDY_EPS and not _has_penalty(p)
        if plain:
            target = logits.argmax(dim=-1).tolist()
            n = 0
            while n < k and target[n] == drafts[n]:
                n += 1
            emitted = [*drafts[:n], target[n]]
        else:
            # the distribution at position j sees the drafts before j as generated tokens
            outs = list(row.output_token_ids)
            rows = [
                SamplingRow(p, row.seed, row.prompt_token_ids, outs + list(drafts[:j]))
                for j in range(k + 1)
            ]
            probs = sampler.probabilities(logits, rows)
            emitted = self._rejection(probs, drafts, draft_probs, row)
        self._record(k, len(emitted) - 1)
        return emitted

    @staticmethod
    def _rejection(
        probs: torch.Tensor,
        drafts: Sequence[int],
        draft_probs: torch.Tensor | None,
        row: SamplingRow,
    ) -> list[int]:
        gen = torch.Generator(device=probs.device)
        out: list[int] = []
        for j, x in enumerate(drafts):
            gen.manual_seed(mix_seed(row.seed ^ _VERIFY_SALT, row.token_index + j))
            p = probs[j]
            q_x = 1.0 if draft_probs is None else float(draft_probs[j, x])
            u = float(torch.rand((), generator=gen, device=probs.device))
            if q_x > 0.0 and u * q_x < float(p[x]):
                out.append(int(x))
                continue
            if draft_probs is None:
                residual = p.clone()
                residual[x] = 0.0
            else:
                residual = (p - draft_probs[j].to(p)).clamp_(min=0.0)
            if float(residual.sum()) <= 0.0:
                residual = p
            out.append(int(torch.multinomial(residual, 1, generator=gen)))
            return out
        gen.manual_seed(mix_seed(row.seed ^ _VERIFY_SALT, row.token_index + len(drafts)))
        out.append(int(torch.multinomial(probs[len(drafts)], 1, generator=gen)))
        return out

    def _record(self, proposed: int, accepted: int) -> None:
        self._count(
            num_drafts=1,
            num_draft_tokens=proposed,
            num_accepted_tokens=accepted,
            num_emitted_tokens=accepted + 1,
        )
        s = self.settings
        if s.min_acceptance_rate <= 0.0:
            return
        self._window.append((proposed, accepted))
        self._window_drafts += proposed
        self._window_accepted += accepted
        while self._window and self._window_drafts - self._window[0][0] >= s.acceptance_window:
            old_p, old_a = self._window.popleft()
            self._window_drafts -= old_p
            self._window_accepted -= old_a
        if (
            self._window_drafts >= s.acceptance_window
            and self._window_accepted < s.min_acceptance_rate * self._window_drafts
        ):
            self._paused_steps = s.disabled_steps
            self._window.clear()
            self._window_drafts = self._window_accepted = 0

    def _count(self, **deltas: int) -> None:
        for stats in (self._stats, self.total):
            for name, d in deltas.items():
                setattr(stats, name, getattr(stats, name) + d)

    def make_stats(self) -> SpeculativeStats:
        """Counters since the previous call (reset)."""
        stats, self._stats = self._stats, SpeculativeStats()
        return stats


def _has_penalty(p: Any) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
