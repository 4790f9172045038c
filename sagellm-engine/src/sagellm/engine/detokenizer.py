"""Incremental detokenization and stop-string detection for one sequence.

Decoding token by token is wrong for most tokenizers: a character may span several
byte-level tokens, and SentencePiece drops the leading space of a token decoded alone.
:class:`IncrementalDetokenizer` therefore decodes a short window that starts a few tokens
back (``prefix_offset``) and emits only what the newest tokens add, holding it back while
the window ends in an incomplete character (U+FFFD), the approach of TGI and vLLM.

:class:`StopStringMatcher` finds stop strings in the growing text and reports how many
trailing characters must be held back because they could still become a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer", "StopStringMatcher"]

#: Prompt tokens kept as decoding context for the first output tokens.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas.

    Usage::

        detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=True)
        text = "".join(detok.add(t) for t in output_ids) + detok.flush()
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        text: str = self._tokenizer.decode(
            ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False
        )
        return text

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is partial)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else new_text
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text of the tokens still held back (an incomplete character at the very end)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else new_text


class StopStringMatcher:
    """Finds the first stop string in a growing text."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self._max_len = max((len(s) for s in self.stop), default=0)

    def __bool__(self) -> bool:
        return bool(self.stop)

    def find(self, text: str, num_new_chars: int) -> tuple[int, str] | None:
        """Earliest ``(position, stop_string)`` that ends within the last ``num_new_chars``.

        Earlier text was already searched when it was new, so only matches overlapping the
        new characters are looked for.
        """
        if not self.stop or num_new_chars <= 0:
            return None
        start = max(0, len(text) - num_new_chars - self._max_len + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        return best

    def holdback(self, text: str) -> int:
        """Trailing characters of ``text`` that are a proper prefix of some stop string."""
        if not self.stop:
            return 0
        for k in range(min(self._max_len - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
