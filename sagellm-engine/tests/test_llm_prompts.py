"""``LLM.generate`` takes vLLM's prompt dicts as well as text and token ids."""

from __future__ import annotations

import pytest

from sagellm.core.errors import InvalidRequestError
from sagellm.core.types import SamplingParams
from sagellm.engine.llm import _prompt_batch


def test_prompt_dicts_become_text_or_token_ids_with_their_salts() -> None:
    batch, salts = _prompt_batch(
        [
            "plain text",
            [5, 6, 7],
            {"prompt": "dict text"},
            {"prompt_token_ids": (1, 2)},
            {"prompt_token_ids": [3], "cache_salt": "mine"},
        ],
        "default",
    )
    assert batch == ["plain text", [5, 6, 7], "dict text", [1, 2], [3]]
    assert salts == ["default", "default", "default", "default", "mine"]


def test_a_single_prompt_of_any_form_is_one_batch() -> None:
    assert _prompt_batch("hi", "")[0] == ["hi"]
    assert _prompt_batch([1, 2], "")[0] == [[1, 2]]
    assert _prompt_batch({"prompt_token_ids": [4]}, "s") == ([[4]], ["s"])


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"text": "x"}, r"unknown keys \['text'\]"),
        ({"prompt": "x", "prompt_token_ids": [1]}, "exactly one of"),
        ({}, "exactly one of"),
        ({"prompt": 3}, "must be a string"),
        ({"prompt": "x", "cache_salt": 1}, "'cache_salt' of a prompt dict must be a string"),
    ],
)
def test_bad_prompt_dicts_say_what_to_give(item: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        _prompt_batch([item], "")


def test_generate_gives_the_same_tokens_for_every_prompt_form(tiny_llm) -> None:  # type: ignore[no-untyped-def]
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    ids = [3, 9, 27, 81]
    outs = tiny_llm.generate([ids, {"prompt_token_ids": ids}], greedy)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert len(outs[0].outputs[0].token_ids) == 4
