"""Incremental detokenization and stop-string matching."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher


class ByteTokenizer:
    """Each token is one UTF-8 byte: multi-byte characters span several tokens."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_character_split_across_tokens_is_emitted_once_complete() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    data = "aé€b".encode()
    deltas = [detok.add(b) for b in data]
    assert deltas == ["a", "", "é", "", "", "€", "b"]
    assert detok.flush() == ""


def test_flush_returns_a_trailing_partial_character() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.add(ord("x")) == "x"
    assert detok.add("é".encode()[0]) == ""
    assert detok.flush() == "\ufffd"


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=0, max_size=30), st.text(min_size=0, max_size=5))
def test_deltas_concatenate_to_the_decoded_text(text: str, prompt: str) -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), list(prompt.encode()))
    out = "".join(detok.add(b) for b in text.encode()) + detok.flush()
    assert out == text


def test_stop_matcher_finds_the_earliest_stop_in_new_text() -> None:
    m = StopStringMatcher(["END", "xy"])
    assert m.find("abcEN", 2) is None
    assert m.find("abcENDxy", 3) == (3, "END")
    assert m.find("axyEND", 6) == (1, "xy")
    assert m.find("abc", 0) is None
    assert not StopStringMatcher([""])


def test_stop_matcher_holds_back_possible_prefixes() -> None:
    m = StopStringMatcher(["END", "xy"])
    assert m.holdback("abcEN") == 2
    assert m.holdback("abcE") == 1
    assert m.holdback("abcx") == 1
    assert m.holdback("abc") == 0
    assert StopStringMatcher([]).holdback("abc") == 0
