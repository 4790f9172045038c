"""The server's reasoning split and per-request chain-of-thought options."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("sagellm.cot")

from sagellm.core.errors import ConfigError
from sagellm.engine.async_engine import AsyncLLMEngine
from sagellm.engine.cli import build_parser, reasoning_markers, server_config_from_args
from sagellm.engine.config import ServerConfig
from sagellm.engine.cot import ReasoningMarkers, ReasoningStream, split_reasoning
from sagellm.engine.server import ServerThread, build_app

from .conftest import assert_no_leak, make_llm

END = "</think>"


@pytest.fixture(scope="module")
def served(tiny_model):
    llm = make_llm(tiny_model, num_blocks=512, max_num_seqs=32, max_num_batched_tokens=512)
    engine = AsyncLLMEngine(llm.engine)
    config = ServerConfig(port=0, reasoning_markers=("", END))
    with ServerThread(build_app(engine, config), config) as srv:
        yield srv, llm
    assert_no_leak(llm, timeout=10.0)


def chat(srv, llm, **body) -> httpx.Response:
    payload = {
        "model": llm.engine.model_name,
        "messages": [{"role": "user", "content": "What is the answer?"}],
        "temperature": 0.0,
        "max_tokens": 12,
        "ignore_eos": True,
        **body,
    }
    return httpx.post(srv.url + "/v1/chat/completions", json=payload, timeout=60)


def test_a_budget_splits_reasoning_from_content_at_the_forced_marker(served) -> None:
    srv, llm = served
    resp = chat(srv, llm, thinking_token_budget=3, logprobs=True)
    assert resp.status_code == 200, resp.text
    (choice,) = resp.json()["choices"]
    pieces = [t["token"] for t in choice["logprobs"]["content"]]
    marker = llm.engine.tokenize(END, add_special_tokens=False)
    text = "".join(pieces)
    # the first 3 tokens are the reasoning, then the forced marker, then the answer
    assert "".join(pieces[3 : 3 + len(marker)]) == END
    assert choice["message"]["reasoning_content"] == "".join(pieces[:3]).strip()
    assert choice["message"]["content"] == "".join(pieces[3 + len(marker) :]).lstrip()
    assert text.startswith("".join(pieces[:3]) + END)


def test_streaming_sends_reasoning_then_content_deltas(served) -> None:
    srv, llm = served
    whole = chat(srv, llm, thinking_token_budget=3).json()["choices"][0]["message"]
    with httpx.stream(
        "POST",
        srv.url + "/v1/chat/completions",
        json={
            "model": llm.engine.model_name,
            "messages": [{"role": "user", "content": "What is the answer?"}],
            "temperature": 0.0,
            "max_tokens": 12,
            "ignore_eos": True,
            "thinking_token_budget": 3,
            "stream": True,
        },
        timeout=60,
    ) as resp:
        lines = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    deltas = [json.loads(ln)["choices"][0]["delta"] for ln in lines[:-1]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert reasoning.strip() == whole["reasoning_content"]
    assert content.lstrip() == whole["content"]
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_content:])


def test_self_consistency_returns_the_samples_and_the_vote(served) -> None:
    srv, llm = served
    sc = {"n": 16, "method": "esc", "window": 4, "options": {"answer": {"method": "text"}}}
    resp = chat(srv, llm, max_tokens=6, self_consistency=sc)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["choices"]) == 4  # greedy samples agree: one window
    vote = body["self_consistency"]
    assert vote["num_samples"] == 4 and vote["num_votes"] == 4
    message = body["choices"][0]["message"]
    # the reasoning opens at the first token (no start marker) and never closes
    assert message["content"] == ""
    assert vote["answer"] == message["reasoning_content"].rstrip(".").strip().lower()
    assert body["usage"]["completion_tokens"] == 4 * 6


def test_streamed_self_consistency_announces_each_drawn_sample_once(served) -> None:
    srv, llm = served
    with httpx.stream(
        "POST",
        srv.url + "/v1/chat/completions",
        json={
            "model": llm.engine.model_name,
            "messages": [{"role": "user", "content": "What is the answer?"}],
            "temperature": 0.0,
            "max_tokens": 4,
            "ignore_eos": True,
            "stream": True,
            "self_consistency": {"n": 8, "window": 2, "options": {"answer": {"method": "text"}}},
        },
        timeout=60,
    ) as resp:
        lines = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
    choices = [json.loads(ln)["choices"][0] for ln in lines[:-1]]
    roles = [c["index"] for c in choices if c["delta"].get("role") == "assistant"]
    assert sorted(roles) == [0, 1]  # greedy samples agree: one window of 2 is drawn
    assert {c["index"] for c in choices} == {0, 1}


def test_bad_self_consistency_options_are_400(served) -> None:
    srv, llm = served
    resp = chat(srv, llm, self_consistency={"n": 4, "windoww": 2})
    assert resp.status_code == 400 and "windoww" in resp.text
    resp = chat(srv, llm, n=2, self_consistency={"n": 4})
    assert resp.status_code == 400
    assert "give the count as self_consistency.n only" in resp.json()["error"]["message"]
    resp = chat(srv, llm, thinking_token_budget=-1)
    assert resp.status_code == 400 and "thinking_token_budget" in resp.text


def test_split_reasoning() -> None:
    m = ReasoningMarkers()
    assert split_reasoning("<think> a b </think>\n\nAnswer 7", m) == ("a b", "Answer 7")
    assert split_reasoning("<think> still going", m) == ("still going", "")
    assert split_reasoning("just text", m) == (None, "just text")
    assert split_reasoning("a b </think> 7", m) == (None, "a b </think> 7")
    opened = ReasoningMarkers(start="")  # the prompt opens the reasoning
    assert split_reasoning("a b </think> 7", opened) == ("a b", "7")
    assert split_reasoning("a b", opened) == ("a b", "")


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab <>/thinkT", max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    start=st.sampled_from(["", "<think>"]),
)
def test_streamed_deltas_add_up_to_the_whole_split(text: str, cuts: list[int], start: str) -> None:
    m = ReasoningMarkers(start=start)
    stream = ReasoningStream(m)
    reasoning = content = ""
    last = 0
    for cut in sorted(c for c in cuts if c <= len(text)) + [len(text)]:
        r, c = stream.feed(text[last:cut])
        reasoning, content, last = reasoning + r, content + c, cut
    r, c = stream.feed("", final=True)
    reasoning, content = reasoning + r, content + c
    whole_r, whole_c = split_reasoning(text, m)
    assert reasoning.strip() == (whole_r or "") and content.lstrip() == whole_c


def test_reasoning_parser_flag() -> None:
    assert reasoning_markers(None) is None
    assert reasoning_markers("think") == ("<think>", "</think>")
    assert reasoning_markers('{"reasoning_start_str": "<r>", "reasoning_end_str": "</r>"}') == (
        "<r>",
        "</r>",
    )
    with pytest.raises(ConfigError, match="give 'think' or JSON"):
        reasoning_markers("deepseek")
    with pytest.raises(ConfigError, match="must not be empty"):
        reasoning_markers('{"reasoning_end_str": ""}')


def test_serve_takes_the_reasoning_parser_into_its_config() -> None:
    args = build_parser().parse_args(["serve", "--reasoning-parser", "think"])
    assert server_config_from_args(args, environ={}).reasoning_markers == ("<think>", "</think>")
    plain = build_parser().parse_args(["serve"])
    assert server_config_from_args(plain, environ={}).reasoning_markers is None
