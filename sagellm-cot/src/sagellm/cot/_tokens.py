"""Token-sequence helpers shared by the token-level controllers."""

from __future__ import annotations

from collections.abc import Sequence


def ends_with(token_ids: Sequence[int], end: int, pattern: Sequence[int]) -> bool:
    """True when ``token_ids[:end]`` ends with ``pattern`` (an empty pattern never matches)."""
    n = len(pattern)
    if n == 0 or end < n:
        return False
    return all(token_ids[end - n + i] == pattern[i] for i in range(n))


def last_after(token_ids: Sequence[int], pattern: Sequence[int]) -> int | None:
    """Index just past the last occurrence of ``pattern`` in ``token_ids``, or None."""
    for end in range(len(token_ids), len(pattern) - 1, -1):
        if ends_with(token_ids, end, pattern):
            return end
    return None


class ReasoningSpan:
    """Tracks where a request's reasoning opens and closes as its tokens arrive.

    ``think_open`` says the reasoning is open; ``num_reasoning_tokens`` counts the tokens
    after the opening marker, the closing marker excluded.
    """

    __slots__ = ("_end", "_start", "closed", "num_reasoning_tokens", "opened", "scanned")

    def __init__(
        self, start: Sequence[int], end: Sequence[int], prompt_token_ids: Sequence[int]
    ) -> None:
        self._start = tuple(start)
        self._end = tuple(end)
        self.opened = not self._start
        self.closed = False
        self.num_reasoning_tokens = 0
        self.scanned = 0  # output tokens already looked at
        if self._start:
            # a prompt whose template opens the reasoning (DeepSeek-R1's "<think>\n")
            s = last_after(prompt_token_ids, self._start)
            e = last_after(prompt_token_ids, self._end)
            self.opened = s is not None and (e is None or s >= e)

    @property
    def think_open(self) -> bool:
        """The reasoning is open and not yet closed."""
        return self.opened and not self.closed

    def advance(self, token_ids: Sequence[int]) -> None:
        """Look at the output tokens not seen yet."""
        for i in range(self.scanned, len(token_ids)):
            if self.closed:
                break
            if not self.opened:
                if ends_with(token_ids, i + 1, self._start):
                    self.opened = True
                continue
            self.num_reasoning_tokens += 1
            if ends_with(token_ids, i + 1, self._end):
                self.closed = True
                # the marker's own tokens are not reasoning
                self.num_reasoning_tokens -= len(self._end)
        self.scanned = len(token_ids)

    def pending_end_prefix(self, token_ids: Sequence[int]) -> int:
        """How many tokens at the end of the output already begin the closing marker."""
        for k in range(min(len(self._end) - 1, len(token_ids)), 0, -1):
            if tuple(token_ids[-k:]) == self._end[:k]:
                return k
        return 0
