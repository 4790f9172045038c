"""Embeddings, tokenize/detokenize, prompt_logprobs and the Responses API of the server."""

from __future__ import annotations

import base64
import json
import math
import struct

import httpx
import openai
import pytest
import torch

from sagellm.core.errors import InvalidRequestError
from sagellm.engine.async_engine import AsyncLLMEngine
from sagellm.engine.config import ServerConfig
from sagellm.engine.llm_engine import PoolingParams
from sagellm.engine.server import ServerThread, build_app
from sagellm.engine.structured import SamplingParams

from .conftest import assert_no_leak, make_llm

HIDDEN = 64  # the tiny model's hidden size


@pytest.fixture(scope="module")
def served(tiny_model):
    llm = make_llm(
        tiny_model, kernels="eager", num_blocks=512, max_num_seqs=64, max_num_batched_tokens=512
    )
    engine = AsyncLLMEngine(llm.engine)
    with ServerThread(build_app(engine, ServerConfig(port=0, pooling="mean"))) as srv:
        yield srv, llm


@pytest.fixture
def server(served):
    srv, llm = served
    yield srv, llm
    assert_no_leak(llm, timeout=10.0)


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60)


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def run_all(engine) -> dict:
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    return outs


# ---------------------------------------------------------------------- engine level


def test_embedding_alone_equals_batched_exactly_and_frees_blocks(tiny_model) -> None:
    llm = make_llm(
        tiny_model, kernels="eager", num_blocks=128, max_num_seqs=16, max_num_batched_tokens=256
    )
    engine = llm.engine
    pool = engine.kv_pool
    for pooling in ("last", "mean"):
        engine.add_request("a", "the quick brown fox", pooling=PoolingParams(pooling))
        alone = run_all(engine)["a"]
        assert pool.num_free_blocks == pool.num_blocks
        engine.add_request("g1", "another prompt entirely", SamplingParams(max_tokens=6))
        engine.add_request("b", "the quick brown fox", pooling=PoolingParams(pooling))
        engine.add_request("c", "something else", pooling=PoolingParams(pooling))
        engine.add_request("g2", "more words", SamplingParams(max_tokens=3))
        outs = run_all(engine)
        assert outs["b"].embedding == alone.embedding  # bit for bit, float32
        assert outs["c"].embedding != alone.embedding
        assert alone.outputs == [] and len(alone.embedding) == HIDDEN
        assert math.isclose(math.fsum(v * v for v in alone.embedding), 1.0, rel_tol=1e-5)
        assert len(outs["g1"].outputs[0].token_ids) == 6
        assert pool.num_free_blocks == pool.num_blocks
    # a second embedding of the same text reuses no cached prefix: same vector, no hits
    engine.add_request("d", "the quick brown fox", pooling=PoolingParams("mean"))
    again = run_all(engine)["d"]
    assert again.metrics.num_cached_tokens == 0


def test_embedding_pooling_matches_the_model_rows(tiny_model) -> None:
    llm = make_llm(tiny_model, kernels="eager", num_blocks=64)
    engine = llm.engine
    ids = engine.tokenize("pooled hidden states")
    model = engine.runtime.model
    seen: list[torch.Tensor] = []
    # the head's input is the final-norm hidden state of every row
    handle = model.lm_head.register_forward_pre_hook(lambda m, i: seen.append(i[0].clone()))
    try:
        engine.runtime.run_sequence(ids)
    finally:
        handle.remove()
    rows = seen[-1].double()
    for pooling, normalize, want in (
        ("last", False, rows[-1]),
        ("mean", False, rows.mean(0)),
        ("mean", True, rows.mean(0) / rows.mean(0).norm()),
    ):
        engine.add_request("e", ids, pooling=PoolingParams(pooling, normalize))
        got = torch.tensor(run_all(engine)["e"].embedding, dtype=torch.float64)
        assert torch.allclose(got, want, atol=1e-5), pooling


def test_embedding_batched_with_bf16_state_is_close(tiny_model) -> None:
    llm = make_llm(tiny_model, dtype="bfloat16", num_blocks=128, max_num_batched_tokens=256)
    engine = llm.engine
    engine.add_request("a", "the quick brown fox", pooling=PoolingParams("mean"))
    alone = torch.tensor(run_all(engine)["a"].embedding)
    engine.add_request("g", "another prompt entirely", SamplingParams(max_tokens=4))
    engine.add_request("b", "the quick brown fox", pooling=PoolingParams("mean"))
    batched = torch.tensor(run_all(engine)["b"].embedding)
    assert torch.allclose(alone, batched, atol=2e-2)
    assert engine.kv_pool.num_free_blocks == engine.kv_pool.num_blocks


def test_llm_embed_alone_batched_normalised_and_as_served(tiny_model) -> None:
    llm = make_llm(
        tiny_model, kernels="eager", num_blocks=128, max_num_seqs=16, max_num_batched_tokens=256
    )
    pool = llm.engine.kv_pool
    text = "the quick brown fox"
    ids = llm.engine.tokenize(text)
    (alone,) = llm.embed(text, "mean")
    assert (alone.prompt, alone.prompt_token_ids, alone.finished) == (text, ids, True)
    vec = alone.outputs.embedding
    assert type(vec) is list and len(vec) == HIDDEN and {type(v) for v in vec} == {float}
    assert math.isclose(math.fsum(v * v for v in vec), 1.0, rel_tol=1e-5)
    prompts = ["something else", {"prompt_token_ids": ids}, text, "more words here"]
    batch = llm.embed(prompts, PoolingParams("mean"))
    assert [o.prompt for o in batch] == ["something else", None, text, "more words here"]
    assert batch[1].prompt_token_ids == ids
    assert batch[1].outputs.embedding == vec and batch[2].outputs.embedding == vec  # bit for bit
    assert batch[0].outputs.embedding != vec
    (raw,) = llm.embed([ids], PoolingParams("mean", normalize=False))
    norm = math.sqrt(math.fsum(v * v for v in raw.outputs.embedding))
    assert abs(norm - 1.0) > 1e-3
    assert [v / norm for v in raw.outputs.embedding] == pytest.approx(vec, abs=1e-6)
    (last,) = llm.embed(text)  # the default: the last token's state, normalised
    assert last.outputs.embedding == llm.embed(text, "last")[0].outputs.embedding
    assert last.outputs.embedding != vec
    assert pool.num_free_blocks == pool.num_blocks
    engine = AsyncLLMEngine(llm.engine)
    with ServerThread(build_app(engine, ServerConfig(port=0, pooling="mean"))) as srv:
        body = {"model": llm.engine.model_name, "input": [text, "something else"]}
        served = post(srv, "/v1/embeddings", body).json()["data"]
    assert [d["embedding"] for d in served] == [vec, batch[0].outputs.embedding]


def test_llm_embed_refuses_bad_input(llm) -> None:
    def refused(*args) -> str:
        with pytest.raises(InvalidRequestError) as info:
            llm.embed(*args)
        assert not llm.engine.has_unfinished_requests()  # nothing stays queued
        return str(info.value)

    assert refused("x", "max") == "pooling must be 'last', 'mean' or a PoolingParams; got 'max'"
    assert refused("x", PoolingParams("max")) == (  # type: ignore[arg-type]
        "PoolingParams.pooling must be 'last' or 'mean'; got 'max'"
    )
    assert refused(["fine", ""]) == "the prompt is empty: give at least one token or character"
    assert refused(["fine", [10**7]]).startswith("token id 10000000 is outside the vocabulary")
    assert refused(["fine", 3.5]) == (
        "a prompt is either a string or a sequence of integer token ids"
    )
    assert refused(None) == (
        "prompts must be a text, a list of token ids, a prompt dict or a list of them; got NoneType"
    )
    assert refused([list(range(1, 300))]) == (
        "the prompt has 299 tokens but the context holds 256 (prompt plus at least one "
        "generated token); shorten the prompt to at most 255 tokens"
    )
    assert llm.embed([]) == []


def test_prompt_logprobs_match_a_full_forward(tiny_model) -> None:
    llm = make_llm(tiny_model, kernels="eager", num_blocks=64, max_num_batched_tokens=4)
    engine = llm.engine
    ids = engine.tokenize("prompt logprobs over chunks")
    engine.add_request("p", ids, SamplingParams(max_tokens=2), prompt_logprobs=3)
    out = run_all(engine)["p"]
    logprobs = torch.log_softmax(engine.runtime.run_sequence(ids), -1)
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(ids) and got[0] is None
    for pos in range(1, len(ids)):
        row = logprobs[pos - 1]
        entry = got[pos]
        assert entry is not None
        assert math.isclose(entry[ids[pos]].logprob, float(row[ids[pos]]), abs_tol=1e-4)
        top = torch.topk(row, 3).indices.tolist()
        assert [t for t in top if t in entry] == top
        assert entry[top[0]].rank == 1
        assert entry[ids[pos]].rank == 1 + int((row > row[ids[pos]]).sum())


# ---------------------------------------------------------------------- HTTP


def test_embeddings_with_the_openai_client(server) -> None:
    srv, llm = server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    name = llm.engine.model_name
    res = client.embeddings.create(model=name, input=["hello there", "general kenobi"])
    assert [d.index for d in res.data] == [0, 1]
    assert all(len(d.embedding) == HIDDEN for d in res.data)
    ids = llm.engine.tokenize("hello there")
    assert res.usage.prompt_tokens == len(ids) + len(llm.engine.tokenize("general kenobi"))
    floats = post(srv, "/v1/embeddings", {"model": name, "input": ids}).json()
    assert floats["object"] == "list" and floats["usage"] == {
        "prompt_tokens": len(ids),
        "total_tokens": len(ids),
    }
    vec = floats["data"][0]["embedding"]
    assert [float(v) for v in struct.unpack(f"<{HIDDEN}f", struct.pack(f"<{HIDDEN}f", *vec))] == [
        pytest.approx(v, abs=1e-7) for v in res.data[0].embedding
    ]
    b64 = post(
        srv, "/v1/embeddings", {"model": name, "input": [ids], "encoding_format": "base64"}
    ).json()["data"][0]["embedding"]
    assert list(struct.unpack(f"<{HIDDEN}f", base64.b64decode(b64))) == [
        struct.unpack("<f", struct.pack("<f", v))[0] for v in vec
    ]
    same = post(
        srv, "/v1/embeddings", {"model": name, "input": "hello there", "dimensions": HIDDEN}
    )
    assert same.status_code == 200
    err = error_of(post(srv, "/v1/embeddings", {"model": name, "input": "x", "dimensions": 8}), 400)
    assert err["message"] == (
        f"dimensions=8 is not supported: this model's embeddings have {HIDDEN} dimensions; "
        f"leave dimensions out or set it to {HIDDEN}"
    )
    assert err["param"] == "dimensions"
    err = error_of(post(srv, "/v1/embeddings", {"model": name, "input": [10**7]}), 400)
    assert err["message"].startswith("token id 10000000 is outside the vocabulary")


def test_tokenize_and_detokenize(server) -> None:
    srv, llm = server
    tok = llm.engine.tokenizer
    got = post(srv, "/tokenize", {"prompt": "hello world"}).json()
    want = tok.encode("hello world", add_special_tokens=True)
    assert got == {"count": len(want), "max_model_len": 256, "tokens": want}
    plain = post(srv, "/tokenize", {"prompt": "hello world", "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode("hello world", add_special_tokens=False)
    messages = [{"role": "user", "content": "hi"}]
    chat = post(srv, "/tokenize", {"messages": messages}).json()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(text, add_special_tokens=False)
    back = post(srv, "/detokenize", {"tokens": plain["tokens"]}).json()
    assert back == {"prompt": tok.decode(plain["tokens"])}
    err = error_of(post(srv, "/detokenize", {"tokens": [1, -1]}), 400)
    vocab = llm.engine.vocab_size
    assert err["message"] == (
        f"token id -1 is outside the vocabulary [0, {vocab}); use ids produced by this "
        "model's tokenizer"
    )
    assert err["param"] == "tokens"
    err = error_of(post(srv, "/tokenize", {"prompt": "a", "messages": messages}), 400)
    assert err["message"] == "give either prompt or messages (not both)"
    error_of(post(srv, "/tokenize", {"prompt": "a", "model": "nope"}), 404)


def test_completion_prompt_logprobs(server) -> None:
    srv, llm = server
    ids = llm.engine.tokenize("one two three")
    body = {"model": llm.engine.model_name, "prompt": ids, "max_tokens": 2, "prompt_logprobs": 1}
    choice = post(srv, "/v1/completions", body).json()["choices"][0]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        entry = plp[pos]
        assert str(ids[pos]) in entry and 1 <= len(entry) <= 2
        assert min(e["rank"] for e in entry.values()) == 1
    plain = post(srv, "/v1/completions", {**body, "prompt_logprobs": None}).json()
    assert "prompt_logprobs" not in plain["choices"][0]


def stream_chunks(srv, path: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", srv.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def test_streamed_prompt_logprobs_come_in_the_first_chunk(server) -> None:
    srv, llm = server
    ids = llm.engine.tokenize("one two three four")
    body = {
        "model": llm.engine.model_name,
        "prompt": ids,
        "max_tokens": 3,
        "temperature": 0.0,
        "ignore_eos": True,
        "prompt_logprobs": 2,
    }
    whole = post(srv, "/v1/completions", body).json()["choices"][0]
    chunks = stream_chunks(srv, "/v1/completions", {**body, "stream": True})
    choices = [c["choices"][0] for c in chunks]
    assert "prompt_logprobs" in choices[0]
    assert all("prompt_logprobs" not in c for c in choices[1:])
    plp = choices[0]["prompt_logprobs"]
    assert plp == whole["prompt_logprobs"]  # the same rows, computed alone both times
    assert len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        entry = plp[pos]
        assert str(ids[pos]) in entry and 2 <= len(entry) <= 3
        assert sorted(e["rank"] for e in entry.values())[:2] == [1, 2]
    assert "".join(c["text"] for c in choices) == whole["text"]
    assert choices[-1]["finish_reason"] == "length"
    # n > 1: every choice gets them once, in its own first chunk
    chunks = stream_chunks(
        srv, "/v1/completions", {**body, "stream": True, "n": 2, "temperature": 1.0, "seed": 3}
    )
    firsts: dict[int, dict] = {}
    for c in chunks:
        (choice,) = c["choices"]
        firsts.setdefault(choice["index"], choice)
        if choice is not firsts[choice["index"]]:
            assert "prompt_logprobs" not in choice
    assert sorted(firsts) == [0, 1]
    assert [firsts[i]["prompt_logprobs"] == plp for i in (0, 1)] == [True, True]


def test_responses_plain_and_streaming(server) -> None:
    srv, llm = server
    name = llm.engine.model_name
    body = {
        "model": name,
        "input": [{"type": "message", "role": "user", "content": "hi"}],
        "instructions": "be brief",
        "max_output_tokens": 5,
        "temperature": 0.0,
    }
    res = post(srv, "/v1/responses", body).json()
    assert res["object"] == "response" and res["status"] == "incomplete"
    assert res["incomplete_details"] == {"reason": "max_output_tokens"}
    (item,) = res["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    (part,) = item["content"]
    assert part["type"] == "output_text"
    assert res["usage"]["output_tokens"] == 5
    text = llm.engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert res["usage"]["input_tokens"] == len(llm.engine.tokenize(text, add_special_tokens=False))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    sdk = client.responses.create(
        model=name, input="hi", instructions="be brief", max_output_tokens=5, temperature=0.0
    )
    assert sdk.output_text == part["text"]
    events = []
    with httpx.stream("POST", srv.url + "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert set(kinds[1:-2]) == {"response.output_text.delta"}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == part["text"] == events[-1]["response"]["output"][0]["content"][0]["text"]
    err = error_of(post(srv, "/v1/responses", {"model": name, "input": []}), 400)
    assert err["message"] == "input must hold at least one message"


def test_rows_requests_over_several_chunks_leave_nothing_in_the_prefix_cache(
    tiny_model,
) -> None:
    pytest.importorskip("sagellm.prefix_cache")
    # 8 tokens a step: the 46-token prompt takes 6 chunks of 2 blocks each but the last
    llm = make_llm(
        tiny_model, kernels="eager", prefix_cache="radix", num_blocks=64, max_num_batched_tokens=8
    )
    engine = llm.engine
    pool, index = engine.kv_pool, engine.parts.prefix_index
    text = "a prompt long enough to fill several blocks of four tokens"
    assert len(engine.tokenize(text)) == 46
    engine.add_request("e", text, pooling=PoolingParams("mean"))
    seen, outs = [], []
    while engine.has_unfinished_requests():
        outs += engine.step()
        seen.append((index.num_cached_blocks, pool.num_free_blocks))
    assert seen == [(0, 62), (0, 60), (0, 58), (0, 56), (0, 54), (0, 64)]
    (first,) = outs
    engine.add_request("p", text, SamplingParams(max_tokens=2), prompt_logprobs=1)
    assert run_all(engine)["p"].metrics.num_cached_tokens == 0
    assert (index.num_cached_blocks, pool.num_free_blocks) == (0, 64)
    # nothing of theirs to hit; a plain request caches its 11 full blocks as always
    engine.add_request("g", text, SamplingParams(max_tokens=2))
    assert run_all(engine)["g"].metrics.num_cached_tokens == 0
    assert (index.num_cached_blocks, pool.num_free_blocks) == (11, 53)
    engine.add_request("g2", text, SamplingParams(max_tokens=2))
    assert run_all(engine)["g2"].metrics.num_cached_tokens == 44
    # an embedding does not read that cache either, and leaves it as it was
    engine.add_request("e2", text, pooling=PoolingParams("mean"))
    again = run_all(engine)["e2"]
    assert again.metrics.num_cached_tokens == 0
    assert (index.num_cached_blocks, pool.num_free_blocks) == (11, 53)
    assert again.embedding == first.embedding


def test_embeddings_leave_nothing_in_the_prefix_cache(tiny_model) -> None:
    pytest.importorskip("sagellm.prefix_cache")
    llm = make_llm(tiny_model, prefix_cache="radix", num_blocks=64, max_num_batched_tokens=256)
    engine = llm.engine
    text = "a prompt long enough to fill several blocks of four tokens"
    engine.add_request("e", text, pooling=PoolingParams("last"))
    run_all(engine)
    assert engine.kv_pool.num_free_blocks == engine.kv_pool.num_blocks
    engine.add_request("g", text, SamplingParams(max_tokens=2))
    assert run_all(engine)["g"].metrics.num_cached_tokens == 0  # nothing was indexed
    engine.add_request("g2", text, SamplingParams(max_tokens=2))
    assert run_all(engine)["g2"].metrics.num_cached_tokens > 0  # generation still shares


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_choices_end_once_when_they_finish_at_different_steps(server, path) -> None:
    srv, llm = server
    name = llm.engine.model_name
    body: dict = {"model": name, "max_tokens": 12, "temperature": 1.0, "seed": 11, "n": 4}
    if path == "/v1/completions":
        body["prompt"] = "one two three"
    else:
        body["messages"] = [{"role": "user", "content": "one two three"}]
    # a stop set wide enough that the four samples end at different steps
    body["stop_token_ids"] = list(range(0, llm.engine.tokenizer.vocab_size, 5))
    whole = post(srv, path, body).json()["choices"]
    chunks = stream_chunks(srv, path, {**body, "stream": True})
    per_index: dict[int, list[dict]] = {}
    for c in chunks:
        for choice in c["choices"]:
            per_index.setdefault(choice["index"], []).append(choice)
    assert sorted(per_index) == [0, 1, 2, 3]
    key = "text" if path == "/v1/completions" else "content"
    for w in whole:
        got = per_index[w["index"]]
        finishes = [ch["finish_reason"] for ch in got if ch["finish_reason"] is not None]
        assert finishes == [w["finish_reason"]]  # exactly one final chunk per choice...
        assert got[-1]["finish_reason"] == w["finish_reason"]  # ...and it is the last
        if key == "text":
            text = "".join(ch["text"] for ch in got)
            assert text == w["text"]
        else:
            text = "".join(ch["delta"].get("content") or "" for ch in got)
            assert text == w["message"]["content"]
    # the case under test: the choices ended at different steps (their chunk counts differ)
    assert len({len(chunks) for chunks in per_index.values()}) > 1
