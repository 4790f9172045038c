"""Answer extraction: the string a sample votes for."""

from __future__ import annotations

import re

from sagellm.cot.config import AnswerConfig

__all__ = ["AnswerExtractor", "normalize_number"]

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_BOXED = "\\boxed{"


def normalize_number(text: str) -> str:
    """Canonical form of a decimal number: no sign '+', no commas, no trailing zeros."""
    t = text.replace(",", "").lstrip("+")
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    if t in ("-0", ""):
        t = "0"
    return t


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    i = start + len(_BOXED)
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: the sample was cut off


class AnswerExtractor:
    """Reads a sample's answer as configured; ``None`` when the sample has none.

    Usage::

        extract = AnswerExtractor(AnswerConfig(method="last_number"))
        extract("3 apples and 4 more make 7.")   # "7"
        AnswerExtractor(AnswerConfig(method="boxed"))("so \\\\boxed{1,000}")  # "1000"
    """

    def __init__(self, config: AnswerConfig | None = None) -> None:
        self.config = config or AnswerConfig()
        self._regex = None
        if self.config.method == "regex":
            assert self.config.pattern is not None
            try:
                self._regex = re.compile(self.config.pattern)
            except re.error as exc:
                raise ValueError(
                    f"answer pattern {self.config.pattern!r} is not a valid regular "
                    f"expression ({exc}); fix it or choose another method"
                ) from exc

    def __call__(self, text: str) -> str | None:
        """The answer in ``text`` in canonical form."""
        cfg = self.config
        if cfg.marker is not None:
            pos = text.rfind(cfg.marker)
            if pos < 0:
                return None
            text = text[pos + len(cfg.marker) :]
        raw: str | None
        if cfg.method in ("last_number", "first_number"):
            found = _NUMBER.findall(text)
            if not found:
                return None
            return normalize_number(found[-1] if cfg.method == "last_number" else found[0])
        if cfg.method == "boxed":
            raw = _last_boxed(text)
        elif cfg.method == "regex":
            assert self._regex is not None
            matches = list(self._regex.finditer(text))
            if not matches:
                return None
            m = matches[-1]
            raw = m.group(1) if m.groups() else m.group(0)
        else:
            raw = text
        if raw is None:
            return None
        raw = raw.strip().rstrip(".").strip()
        if not raw:
            return None
        if _NUMBER.fullmatch(raw):
            return normalize_number(raw)
        return raw.lower() if cfg.lowercase else raw
