"""Structured outputs and tool calls: the grammar really constrains a random model."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from sagellm.engine.async_engine import AsyncLLMEngine
from sagellm.engine.config import ServerConfig
from sagellm.engine.server import ServerThread, build_app
from sagellm.engine.server.tools import HermesToolParser, Llama3JsonToolParser, make_parser
from sagellm.engine.structured import SamplingParams, StructuredOutput

from .conftest import assert_no_leak, make_llm

pytest.importorskip("xgrammar")

SCHEMAS = [
    {  # required fields, bounded string, integer range
        # (a bare maxLength string is not used: xgrammar 0.2.9 lets raw control characters
        # into length-counted strings, which is not JSON)
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
        },
        "required": ["name", "age"],
    },
    {  # enum and boolean
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"},
        },
        "required": ["color", "ok"],
    },
    {  # array with bounds, nested object
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"enum": ["a", "b", "c"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -5, "maximum": 5},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["x", "y"],
            },
        },
        "required": ["tags", "point"],
    },
    {  # top-level array of small objects
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["id"],
        },
        "minItems": 1,
        "maxItems": 2,
    },
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Rome"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 9},
                    "b": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["a", "b"],
            },
        },
    },
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def served(tiny_model):
    # max_model_len 1024: the tool list in the prompt is ~800 tokens of the tiny vocabulary
    llm = make_llm(
        tiny_model,
        num_blocks=1024,
        max_num_seqs=64,
        max_num_batched_tokens=1024,
        max_model_len=1024,
    )
    engine = AsyncLLMEngine(llm.engine)
    config = ServerConfig(port=0, tool_call_parser="hermes", enable_auto_tool_choice=True)
    with ServerThread(build_app(engine, config), config) as srv:
        yield srv, llm


@pytest.fixture
def server(served):
    srv, llm = served
    yield srv, llm
    assert_no_leak(llm, timeout=10.0)


def client_of(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


def chat_body(llm, **fields) -> dict:
    return {
        "model": llm.engine.model_name,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 160,
        **fields,
    }


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60)


def sse_chunks(srv, path: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", srv.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks


# ---------------------------------------------------------------------------- offline


def test_offline_json_schema_constrains_every_completion(llm) -> None:
    schema = SCHEMAS[0]
    params = SamplingParams(
        n=3,
        temperature=1.0,
        seed=7,
        max_tokens=120,
        structured_output=StructuredOutput(json=schema),
    )
    (out,) = llm.generate(["hello"], params)
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert c.finish_reason.value == "stop"
        jsonschema.validate(json.loads(c.text), schema)
        assert c.token_ids[-1] in llm.engine.eos_token_ids  # the grammar ended on EOS
    # unconstrained, the same model writes no JSON at all
    (free,) = llm.generate(["hello"], SamplingParams(temperature=1.0, seed=7, max_tokens=40))
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.outputs[0].text)


def test_offline_regex_choice_and_grammar_match_exactly(llm) -> None:
    cases = [
        (StructuredOutput(regex=r"[a-z]{3}-[0-9]{2}"), r"[a-z]{3}-[0-9]{2}"),
        (StructuredOutput(choice=["yes", "no", "maybe"]), r"yes|no|maybe"),
        (StructuredOutput(grammar='root ::= "(" [0-9]+ ")" | "none"'), r"\([0-9]+\)|none"),
    ]
    for spec, pattern in cases:
        params = SamplingParams(temperature=1.0, seed=3, max_tokens=60, structured_output=spec)
        outs = llm.generate(["a", "b c", "d e f"], params)
        for out in outs:
            (c,) = out.outputs
            assert c.finish_reason.value == "stop", spec
            assert re.fullmatch(pattern, c.text), (spec, c.text)


def test_logprobs_and_stop_strings_with_a_grammar(llm) -> None:
    spec = StructuredOutput(regex=r"ab(cd)+x")
    params = SamplingParams(
        temperature=0.0, max_tokens=40, logprobs=2, stop=("cdcd",), structured_output=spec
    )
    (out,) = llm.generate(["q"], params)
    (c,) = out.outputs
    # the stop string ends the grammar's output early (and is not returned)
    assert c.finish_reason.value == "stop" and c.stop_reason == "cdcd"
    assert c.text == "ab"
    assert len(c.logprobs) == len(c.token_ids)
    for tid, entry in zip(c.token_ids, c.logprobs):
        assert tid in entry and entry[tid] > float("-inf")


def test_preemption_does_not_advance_the_matcher_twice(tiny_model, llm) -> None:
    schema = SCHEMAS[2]
    params = SamplingParams(
        temperature=0.0, max_tokens=48, structured_output=StructuredOutput(json=schema)
    )
    prompts = [[5 + i, 6, 7, 8, 9, 10, 11, 12] for i in range(8)]
    reference = [o.outputs[0].text for o in llm.generate(prompts, params)]
    small = make_llm(tiny_model, num_blocks=24, max_model_len=64)
    small.engine.make_stats()
    got = [o.outputs[0].text for o in small.generate(prompts, params)]
    assert small.engine.make_stats().num_preemptions > 0
    assert got == reference
    for text in got:
        jsonschema.validate(json.loads(text), schema)
    assert_no_leak(small)


def test_an_invalid_constraint_is_refused_with_the_reason(llm) -> None:
    bad = SamplingParams(
        max_tokens=4, structured_output=StructuredOutput(json={"type": "no-such-type"})
    )
    with pytest.raises(Exception) as err:
        llm.generate(["x"], bad)
    assert (
        str(err.value) == 'the json constraint cannot be compiled: Unsupported type "no-such-type"'
    )
    with pytest.raises(ValueError, match="give exactly one of json, json_object, regex"):
        StructuredOutput(regex="a", choice=["b"])


def test_compiled_grammars_are_cached(llm) -> None:
    structured = llm.engine.structured
    spec = StructuredOutput(json={"type": "object", "properties": {"k": {"enum": [1, 2]}}})
    before = structured.num_compiled
    params = SamplingParams(max_tokens=30, temperature=0.0, structured_output=spec)
    llm.generate(["a", "b"], params)
    llm.generate(["c"], params)
    assert structured.num_compiled == before + 1


# ---------------------------------------------------------------------------- server


def test_json_schema_over_http_validates_for_every_schema(server) -> None:
    srv, llm = server
    for i, schema in enumerate(SCHEMAS):
        rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        resp = post(
            srv,
            "/v1/chat/completions",
            chat_body(llm, response_format=rf, n=2, temperature=1.0, seed=i),
        )
        assert resp.status_code == 200, resp.text
        for choice in resp.json()["choices"]:
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
        # streamed: the concatenated deltas validate too
        chunks = sse_chunks(
            srv, "/v1/chat/completions", chat_body(llm, response_format=rf, temperature=1.0, seed=i)
        )
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        jsonschema.validate(json.loads(text), schema)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_guided_fields_on_completions(server) -> None:
    srv, llm = server
    base = {"model": llm.engine.model_name, "prompt": "x", "max_tokens": 40, "temperature": 1.0}
    resp = post(srv, "/v1/completions", {**base, "guided_regex": "[0-9]{4}", "n": 3})
    assert [bool(re.fullmatch("[0-9]{4}", c["text"])) for c in resp.json()["choices"]] == [True] * 3
    resp = post(srv, "/v1/completions", {**base, "guided_choice": ["left", "right"]})
    assert resp.json()["choices"][0]["text"] in ("left", "right")
    resp = post(srv, "/v1/completions", {**base, "structured_outputs": {"regex": "z+y"}})
    assert re.fullmatch("z+y", resp.json()["choices"][0]["text"])
    resp = post(srv, "/v1/completions", {**base, "guided_json": SCHEMAS[1]})
    jsonschema.validate(json.loads(resp.json()["choices"][0]["text"]), SCHEMAS[1])


def test_bad_constraints_are_400_with_the_reason(server) -> None:
    srv, llm = server
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    resp = post(srv, "/v1/chat/completions", chat_body(llm, response_format=bad_schema))
    assert resp.status_code == 400
    assert (
        resp.json()["error"]["message"]
        == 'the json constraint cannot be compiled: Unsupported type "nope"'
    )
    resp = post(srv, "/v1/chat/completions", chat_body(llm, guided_regex="[a-"))
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == (
        "the regex constraint cannot be compiled: Regex parsing error at position 4: Unclosed '['"
    )
    resp = post(srv, "/v1/chat/completions", chat_body(llm, guided_regex="a", guided_choice=["b"]))
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == (
        "give one output constraint per request; got guided_regex and guided_choice"
    )
    resp = post(srv, "/v1/chat/completions", chat_body(llm, response_format={"type": "xml"}))
    assert resp.status_code == 400
    assert "response_format type 'xml' is not supported" in resp.json()["error"]["message"]
    # the server still serves afterwards
    ok = post(srv, "/v1/chat/completions", chat_body(llm, max_tokens=3))
    assert ok.status_code == 200


def test_tool_choice_required_and_named_always_parse(server) -> None:
    srv, llm = server
    named = {"type": "function", "function": {"name": "add"}}
    for choice in ("required", named):
        for seed in range(3):
            body = chat_body(
                llm,
                tools=TOOLS,
                tool_choice=choice,
                temperature=1.0,
                seed=seed,
                parallel_tool_calls=False,
            )
            resp = post(srv, "/v1/chat/completions", body)
            assert resp.status_code == 200, resp.text
            (c,) = resp.json()["choices"]
            assert c["finish_reason"] == "tool_calls", c
            (call,) = c["message"]["tool_calls"]
            assert call["id"].startswith("call_") and call["type"] == "function"
            name = call["function"]["name"]
            if choice is named:
                assert name == "add"
            jsonschema.validate(json.loads(call["function"]["arguments"]), TOOL_SCHEMAS[name])
            # streamed
            chunks = sse_chunks(srv, "/v1/chat/completions", body)
            calls = [
                tc
                for ch in chunks
                if ch["choices"]
                for tc in ch["choices"][0]["delta"].get("tool_calls", [])
            ]
            assert len(calls) == 1 and calls[0]["index"] == 0
            assert calls[0]["function"]["name"] in TOOL_SCHEMAS
            args = json.loads(calls[0]["function"]["arguments"])
            jsonschema.validate(args, TOOL_SCHEMAS[calls[0]["function"]["name"]])
            assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_errors(server) -> None:
    srv, llm = server
    resp = post(
        srv,
        "/v1/chat/completions",
        chat_body(llm, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == (
        "tool_choice names the function 'nope', which is not in tools ('get_weather', 'add')"
    )
    resp = post(srv, "/v1/chat/completions", chat_body(llm, tool_choice="required"))
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "tool_choice needs tools: give the functions in tools"


def test_auto_tool_choice_needs_the_server_flags(tiny_model) -> None:
    llm = make_llm(tiny_model, num_blocks=512, max_model_len=1024)
    with ServerThread(build_app(AsyncLLMEngine(llm.engine)), ServerConfig(port=0)) as srv:
        resp = post(srv, "/v1/chat/completions", chat_body(llm, tools=TOOLS, max_tokens=4))
        assert resp.status_code == 400
        assert resp.json()["error"]["message"].startswith(
            'tool_choice "auto" (the default with tools) needs a server started with '
            "--enable-auto-tool-choice and --tool-call-parser"
        )
        resp = post(
            srv,
            "/v1/chat/completions",
            chat_body(llm, tools=TOOLS, tool_choice="none", max_tokens=4),
        )
        assert resp.status_code == 200
        # "none": the tools stay out of the prompt and the reply is plain text
        assert "tool_calls" not in resp.json()["choices"][0]["message"]
        assert resp.json()["usage"]["prompt_tokens"] < 100


def test_openai_client_round_trip(server) -> None:
    srv, llm = server
    client = client_of(srv)
    schema = SCHEMAS[1]
    resp = client.chat.completions.create(
        model=llm.engine.model_name,
        messages=[{"role": "user", "content": "a color"}],
        max_tokens=80,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "c", "schema": schema, "strict": True},
        },
    )
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    resp = client.chat.completions.create(
        model=llm.engine.model_name,
        messages=[{"role": "user", "content": "weather in Paris?"}],
        max_tokens=120,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, TOOL_SCHEMAS["get_weather"])
    # the call and its result go back in; the conversation renders and runs
    follow = client.chat.completions.create(
        model=llm.engine.model_name,
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
        max_tokens=4,
        tools=TOOLS,
        tool_choice="auto",
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---------------------------------------------------------------------------- parsers


def test_hermes_parser_exact_strings() -> None:
    p = HermesToolParser()
    content, calls = p.parse(
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    )
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris"}'),
        ("add", '{"a": 1, "b": 2}'),
    ]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert HermesToolParser().parse("no calls here") == ("no calls here", [])
    # a broken call stays text
    assert HermesToolParser().parse("<tool_call>{oops</tool_call>") == (
        "<tool_call>{oops</tool_call>",
        [],
    )


def test_hermes_parser_streams_calls_when_complete() -> None:
    text = 'Hi <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    p = HermesToolParser()
    got_content, got_calls = [], []
    for i in range(0, len(text), 3):
        content, calls = p.feed(text[i : i + 3], final=i + 3 >= len(text))
        got_content.append(content)
        got_calls.extend(calls)
    assert "".join(got_content) == "Hi "
    assert [(c.name, c.arguments) for c in got_calls] == [("f", '{"x": 1}')]
    # "<tool" is held back until it is known not to start a call
    q = HermesToolParser()
    assert q.feed("a <tool", final=False) == ("a ", [])
    assert q.feed("box", final=True) == ("<toolbox", [])


def test_llama3_json_parser_exact_strings() -> None:
    content, calls = Llama3JsonToolParser().parse(
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
        '{"name": "add", "parameters": {"a": 3, "b": 4}}'
    )
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Rome"}'),
        ("add", '{"a": 3, "b": 4}'),
    ]
    assert Llama3JsonToolParser().parse("The answer is 4.") == ("The answer is 4.", [])
    assert Llama3JsonToolParser().parse('{"city": "Rome"}') == ('{"city": "Rome"}', [])
    p = make_parser("llama3_json")
    assert p.feed('{"name": "f", "para', final=False) == ("", [])
    content, calls = p.feed('meters": {}}', final=True)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", "{}")]
