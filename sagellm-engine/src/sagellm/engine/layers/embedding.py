"""Token embedding and the output head (which may share its weight)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sagellm.engine.layers.linear import Linear

__all__ = ["LMHead", "VocabEmbedding"]


class VocabEmbedding(nn.Module):
    """Rows of the embedding table for each token id."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        # None once the rows come from blocks (:meth:`use_blocks`)
        self.weight: Any = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self._codes: torch.Tensor | None = None
        self._scales: torch.Tensor | None = None
        self._dtype = torch.float32

    def use_blocks(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        """Look rows up in int8 blocks of 32 (``codes [V, H]``, ``scales [V, H / 32]``,
        e.g. a tied Q8_0 head's) instead of a float table, which is dropped."""
        v, h = codes.shape
        if codes.dtype != torch.int8 or tuple(scales.shape) != (v, h // 32) or h % 32:
            raise ValueError(
                f"embedding blocks must be int8 [V, H] with [V, H/32] scales, got "
                f"{codes.dtype} {list(codes.shape)} and {list(scales.shape)}"
            )
        self._codes, self._scales, self._dtype = codes, scales, dtype
        self.weight = None

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self._codes is None:
            assert self.weight is not None
            return F.embedding(token_ids, self.weight)
        assert self._scales is not None
        rows = self._codes[token_ids].reshape(*token_ids.shape, -1, 32).to(torch.float32)
        rows = rows * self._scales[token_ids].unsqueeze(-1)
        return rows.reshape(*token_ids.shape, -1).to(self._dtype)


class LMHead(Linear):
    """Vocabulary logits in float32; called only on the rows that are sampled.

    A projection like any other (a quantizer may give it its own method: it is a fifth
    of the bytes read per decoded token here); a tied head shares the embedding tensor
    until a method converts it into its own form.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tied: VocabEmbedding | None) -> None:
        super().__init__(hidden_size, (vocab_size,))
        if tied is not None:
            self.weight = tied.weight  # one tensor, not a copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x).float()
