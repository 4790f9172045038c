"""Token embedding and the output head (which may share its weight)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sagellm.engine.layers.linear import Linear

__all__ = ["LMHead", "VocabEmbedding"]


class VocabEmbedding(nn.Module):
    """Rows of the embedding table for each token id."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)


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
