"""Prompt lookup: draft the tokens that followed an earlier occurrence of the context's end.

Anchor: vLLM v1 ``NgramProposer`` and Prompt Lookup Decoding. For n from
``prompt_lookup_max`` down to ``prompt_lookup_min``, the last n tokens of the context are
looked for earlier in the context (prompt and output together); the first n that matches
wins and the tokens after its earliest occurrence are the draft. Input-grounded tasks
(quoting, summarising, editing text of the prompt) copy long spans, so such drafts are
often right; on free chat they rarely match and cost nothing but the lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from sagellm.core.types import DraftRequest, SpeculativeDraft
from sagellm.speculative.config import NgramConfig

__all__ = ["NgramProposer", "find_ngram_draft"]


def find_ngram_draft(
    token_ids: Sequence[int], min_n: int, max_n: int, num_tokens: int
) -> tuple[int, ...]:
    """The up to ``num_tokens`` tokens after the earliest earlier occurrence of the longest
    suffix of ``token_ids`` whose length lies in ``min_n..max_n``; () when none occurs."""
    length = len(token_ids)
    if num_tokens <= 0 or length < min_n + 1:
        return ()
    tokens = list(token_ids)
    last = tokens[-1]
    # Candidate ends: earlier positions holding the last token (an occurrence must end
    # before the final position so that at least one token follows it).
    ends = [i for i in range(length - 1) if tokens[i] == last]
    if not ends:
        return ()
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        for end in ends:
            start = end - n + 1
            if start >= 0 and tokens[start : end + 1] == suffix:
                return tuple(tokens[end + 1 : end + 1 + num_tokens])
    return ()


class NgramProposer:
    """Drafts by prompt lookup (vLLM's ``{"method": "ngram", ...}``).

    Usage::

        proposer = NgramProposer(NgramConfig(num_speculative_tokens=4))
        [draft] = proposer.propose([DraftRequest("r", [5, 6, 7, 8, 5, 6], [], 4)])
        draft.token_ids  # (7, 8, 5, 6)
    """

    config_class: ClassVar[type[NgramConfig]] = NgramConfig

    def __init__(self, config: NgramConfig | None = None, **context: Any) -> None:
        self.config = config or NgramConfig()

    @property
    def num_speculative_tokens(self) -> int:
        return self.config.num_speculative_tokens

    def propose(self, requests: Sequence[DraftRequest]) -> list[SpeculativeDraft]:
        cfg = self.config
        out = []
        for req in requests:
            k = min(req.num_tokens, cfg.num_speculative_tokens)
            draft = find_ngram_draft(req.token_ids, cfg.prompt_lookup_min, cfg.prompt_lookup_max, k)
            out.append(SpeculativeDraft(req.request_id, draft))
        return out

    def observe_finished(
        self, request_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int]
    ) -> None:
        """Prompt lookup keeps no state."""
