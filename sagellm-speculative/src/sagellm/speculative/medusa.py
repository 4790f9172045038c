"""``medusa``: extra decoding heads on the target's last hidden state (Medusa, Cai et al.
2024).

Head ``i`` maps the target's final-norm hidden state ``h`` at the newest token (the row
whose logits gave that token) to the token ``i + 1`` places after it:
``logits_i = W_i^out (h + SiLU(W_i h + b_i))``, one residual block and a projection onto
the vocabulary, as in Medusa-1. The drafts are the heads' argmax tokens in order (the
top-1 chain; no tree), greedy, so the verifier sees point masses.

Heads load from a folder with ``medusa_lm_head.safetensors`` (or any one ``*.safetensors``
file) holding, per head ``i``, ``medusa_head.{i}.0.linear.weight [H, H]``,
``medusa_head.{i}.0.linear.bias [H]`` and ``medusa_head.{i}.1.weight [V, H]`` (the layout
of the Medusa project's checkpoints with one residual layer). Every tensor is
shape-checked against the others and the target's hidden size and vocabulary when the
engine gives them. :func:`save_heads` writes that layout (for tests with random heads:
no trained heads exist for the embedded model).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from sagellm.core.errors import ConfigError
from sagellm.core.types import DraftRequest, SpeculativeDraft

__all__ = ["MedusaConfig", "MedusaHeads", "MedusaProposer", "save_heads"]

_KEY = re.compile(r"medusa_head\.(\d+)\.(0\.linear\.weight|0\.linear\.bias|1\.weight)")


class MedusaConfig(BaseModel):
    """Where the heads are and how many of them draft."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_speculative_tokens: int = Field(4, ge=1, le=16)  # at most the number of heads
    model: str  # folder (or file) of the heads' safetensors
    dtype: str = "float32"  # compute dtype of the heads


class MedusaHeads(torch.nn.Module):
    """The residual blocks and vocabulary projections of ``num_heads`` heads."""

    def __init__(self, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        found: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in weights.items():
            m = _KEY.fullmatch(key)
            if m is None:
                raise ConfigError(
                    f"unexpected tensor {key!r} in the Medusa heads; expected "
                    "medusa_head.{i}.0.linear.weight/bias and medusa_head.{i}.1.weight"
                )
            found.setdefault(int(m.group(1)), {})[m.group(2)] = value
        if not found or sorted(found) != list(range(len(found))):
            raise ConfigError(f"Medusa heads must be numbered 0..n-1, found {sorted(found)}")
        hidden = vocab = None
        self.blocks = torch.nn.ModuleList()
        self.outs = torch.nn.ModuleList()
        for i in range(len(found)):
            part = found[i]
            missing = {"0.linear.weight", "0.linear.bias", "1.weight"} - set(part)
            if missing:
                raise ConfigError(f"Medusa head {i} lacks {sorted(missing)}")
            w, b, out = part["0.linear.weight"], part["0.linear.bias"], part["1.weight"]
            h = w.shape[1]
            hidden = hidden or h
            vocab = vocab or out.shape[0]
            if tuple(w.shape) != (hidden, hidden) or tuple(b.shape) != (hidden,):
                raise ConfigError(
                    f"Medusa head {i}: residual block {tuple(w.shape)} + bias "
                    f"{tuple(b.shape)}, expected ({hidden}, {hidden}) + ({hidden},)"
                )
            if tuple(out.shape) != (vocab, hidden):
                raise ConfigError(
                    f"Medusa head {i}: projection {tuple(out.shape)}, expected ({vocab}, {hidden})"
                )
            block = torch.nn.Linear(hidden, hidden, dtype=dtype)
            block.weight.data.copy_(w)
            block.bias.data.copy_(b)
            proj = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)
            proj.weight.data.copy_(out)
            self.blocks.append(block)
            self.outs.append(proj)
        assert hidden is not None and vocab is not None
        self.hidden_size, self.vocab_size = int(hidden), int(vocab)
        self.requires_grad_(False)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, num_heads: int) -> torch.Tensor:
        """Logits ``[rows, num_heads, vocab]`` of the first ``num_heads`` heads."""
        first: Any = self.blocks[0]
        x = hidden.to(first.weight.dtype)
        rows = []
        for block, proj in zip(self.blocks[:num_heads], self.outs[:num_heads]):
            rows.append(proj(x + torch.nn.functional.silu(block(x))))
        return torch.stack(rows, dim=1)


def _load(path: str, dtype: torch.dtype) -> MedusaHeads:
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        named = p / "medusa_lm_head.safetensors"
        files = [named] if named.exists() else sorted(p.glob("*.safetensors"))
        if len(files) != 1:
            raise ConfigError(
                f"{p} holds {len(files)} safetensors files; give the folder of one Medusa "
                "checkpoint (medusa_lm_head.safetensors) or the file itself"
            )
        p = files[0]
    if not p.is_file():
        raise ConfigError(f"Medusa heads {path!r} not found")
    return MedusaHeads(load_file(str(p)), dtype)


def save_heads(
    path: str | Path, heads: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> Path:
    """Write ``(block weight, block bias, projection)`` per head in the Medusa layout to
    ``path/medusa_lm_head.safetensors``; the file's path."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for i, (w, b, out) in enumerate(heads):
        tensors[f"medusa_head.{i}.0.linear.weight"] = w.contiguous()
        tensors[f"medusa_head.{i}.0.linear.bias"] = b.contiguous()
        tensors[f"medusa_head.{i}.1.weight"] = out.contiguous()
    file = folder / "medusa_lm_head.safetensors"
    save_file(tensors, str(file))
    return file


class MedusaProposer:
    """Drafts from Medusa heads (implements ``sagellm.core.protocols.Proposer``)."""

    config_class: ClassVar[type[BaseModel]] = MedusaConfig
    needs_hidden_states: ClassVar[bool] = True

    def __init__(
        self, config: MedusaConfig | None = None, *, runtime: Any = None, **_context: Any
    ) -> None:
        if config is None:
            raise ConfigError(
                "the medusa proposer needs its heads: speculative_config "
                '{"method": "medusa", "model": "/path/to/heads"}'
            )
        self.config = config
        dtype = getattr(torch, config.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"dtype {config.dtype!r} is not a torch dtype")
        self.heads = _load(config.model, dtype)
        if config.num_speculative_tokens > self.heads.num_heads:
            raise ConfigError(
                f"num_speculative_tokens={config.num_speculative_tokens} exceeds the "
                f"{self.heads.num_heads} Medusa heads in {config.model!r}"
            )
        if runtime is not None:
            self._check_target(runtime)

    def _check_target(self, runtime: Any) -> None:
        caps = getattr(runtime, "model_config", None)
        hidden = getattr(caps, "hidden_size", None)
        vocab = getattr(caps, "vocab_size", None)
        if hidden is not None and hidden != self.heads.hidden_size:
            raise ConfigError(
                f"the Medusa heads take hidden states of size {self.heads.hidden_size}; the "
                f"target's are {hidden}"
            )
        if vocab is not None and vocab != self.heads.vocab_size:
            raise ConfigError(
                f"the Medusa heads predict {self.heads.vocab_size} tokens; the target's "
                f"vocabulary has {vocab}"
            )

    @property
    def num_speculative_tokens(self) -> int:
        return int(self.config.num_speculative_tokens)

    def propose(self, requests: Sequence[DraftRequest]) -> list[SpeculativeDraft]:
        k = self.num_speculative_tokens
        ready = [r for r in requests if r.num_tokens > 0 and r.hidden_state is not None]
        drafts: dict[str, tuple[int, ...]] = {r.request_id: () for r in requests}
        if ready:
            hidden = torch.stack([torch.as_tensor(r.hidden_state).float() for r in ready])
            if hidden.shape[-1] != self.heads.hidden_size:
                raise ConfigError(
                    f"hidden states of size {hidden.shape[-1]} reached Medusa heads of size "
                    f"{self.heads.hidden_size}"
                )
            tokens = self.heads(hidden, k).argmax(dim=-1).tolist()
            for r, toks in zip(ready, tokens):
                drafts[r.request_id] = tuple(int(t) for t in toks[: min(k, r.num_tokens)])
        return [SpeculativeDraft(r.request_id, drafts[r.request_id]) for r in requests]

    def observe_finished(
        self, request_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int]
    ) -> None:
        return None
