"""The OpenAI-compatible server, driven by the official openai client and raw httpx."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from sagellm.engine.async_engine import AsyncLLMEngine
from sagellm.engine.config import ServerConfig
from sagellm.engine.server import ServerThread, build_app

from .conftest import assert_no_leak, make_llm, slow_down, wait_idle


@pytest.fixture(scope="module")
def served(tiny_model):
    llm = make_llm(tiny_model, num_blocks=512, max_num_seqs=64, max_num_batched_tokens=512)
    engine = AsyncLLMEngine(llm.engine)
    with ServerThread(build_app(engine), ServerConfig(port=0)) as srv:
        yield srv, llm


@pytest.fixture
def server(served):
    srv, llm = served
    yield srv, llm
    assert_no_leak(llm, timeout=10.0)


def client_of(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


def model_name(llm) -> str:
    return llm.engine.model_name


def assert_openai_error(resp: httpx.Response, status: int, *, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_models_health_and_version(server) -> None:
    srv, llm = server
    models = client_of(srv).models.list()
    assert [m.id for m in models.data] == [model_name(llm)]
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    assert "version" in httpx.get(srv.url + "/version").json()


def test_completion_matches_the_offline_engine(server) -> None:
    srv, llm = server
    resp = client_of(srv).completions.create(
        model=model_name(llm),
        prompt=[5, 6, 7],
        max_tokens=8,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert resp.object == "text_completion"
    (choice,) = resp.choices
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == 3 and resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == 11
    tok = llm.tokenizer
    assert tok.encode(choice.text, add_special_tokens=False) or choice.text == ""


def test_streaming_completion_concatenates_to_the_full_text(server) -> None:
    srv, llm = server
    c = client_of(srv)
    kwargs = dict(
        model=model_name(llm),
        prompt="hello world",
        max_tokens=10,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    full = c.completions.create(**kwargs).choices[0].text
    chunks = list(
        c.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []


def test_chat_completion_and_streaming_agree(server) -> None:
    srv, llm = server
    c = client_of(srv)
    kwargs = dict(
        model=model_name(llm),
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=12,
        temperature=0.0,
    )
    resp = c.chat.completions.create(**kwargs)
    assert resp.object == "chat.completion"
    msg = resp.choices[0].message
    assert msg.role == "assistant"
    chunks = list(c.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == msg.content
    assert chunks[-1].choices[0].finish_reason == resp.choices[0].finish_reason
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert resp.usage.prompt_tokens == len(llm.tokenizer.encode(prompt, add_special_tokens=False))


def test_n_seed_logprobs_and_stop(server) -> None:
    srv, llm = server
    c = client_of(srv)
    resp = c.completions.create(
        model=model_name(llm),
        prompt=[4, 5, 6],
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=11,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(ch.index for ch in resp.choices) == [0, 1, 2]
    for ch in resp.choices:
        assert len(ch.logprobs.tokens) == 6 and len(ch.logprobs.token_logprobs) == 6
        assert all(lp <= 0 for lp in ch.logprobs.token_logprobs)
    again = c.completions.create(
        model=model_name(llm),
        prompt=[4, 5, 6],
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=11,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert [ch.text for ch in again.choices] == [ch.text for ch in resp.choices]
    chat = c.chat.completions.create(
        model=model_name(llm),
        max_tokens=5,
        temperature=0.0,
        messages=[{"role": "user", "content": "x"}],
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in content)
    base = (
        c.completions.create(
            model=model_name(llm),
            prompt=[21, 22, 23],
            max_tokens=24,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    stop = base[5:8]
    cut = c.completions.create(
        model=model_name(llm),
        prompt=[21, 22, 23],
        max_tokens=24,
        temperature=0.0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].text == base[: base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_32_concurrent_clients_get_the_sequential_answers(server) -> None:
    srv, llm = server
    c = client_of(srv)
    prompts = [[3 + i, 4 + (i * 7) % 50, 5 + (i * 3) % 40] for i in range(32)]

    def ask(p: list[int]) -> str:
        return (
            c.completions.create(
                model=model_name(llm),
                prompt=p,
                max_tokens=8,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    sequential = [ask(p) for p in prompts[:4]]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent[:4] == sequential
    assert len(concurrent) == 32


def post(srv, path: str, body: Any) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        srv.url + path, content=data, headers={"content-type": "application/json"}, timeout=30
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"prompt": "x"}, 400, "model"),
        ("/v1/completions", {"model": "MODEL", "prompt": 5}, 400, "prompt"),
        (
            "/v1/completions",
            {"model": "MODEL", "prompt": "x", "max_tokens": "ten"},
            400,
            "max_tokens",
        ),
        ("/v1/completions", {"model": "MODEL", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        (
            "/v1/completions",
            {"model": "MODEL", "prompt": "x", "max_tokens": 10**12},
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            {"model": "MODEL", "prompt": "x", "temperature": -1.0},
            400,
            "temperature",
        ),
        ("/v1/completions", {"model": "MODEL", "prompt": "x", "n": 0}, 400, "n"),
        ("/v1/completions", {"model": "MODEL", "prompt": [1] * 300}, 400, "prompt"),
        ("/v1/completions", {"model": "MODEL", "prompt": [10**9]}, 400, None),
        ("/v1/completions", {"model": "MODEL", "prompt": []}, 400, None),
        ("/v1/completions", {"model": "MODEL", "prompt": "x", "logit_bias": {"1": 5}}, 400, None),
        ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "model"),
        ("/v1/chat/completions", {"model": "MODEL", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "MODEL", "messages": "hi"}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "MODEL", "messages": [{"content": "x"}]},
            400,
            "messages.0.role",
        ),
        (
            "/v1/chat/completions",
            {"model": "MODEL", "messages": [{"role": "user", "content": 3}]},
            400,
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            400,
            "stream",
        ),
        (
            "/v1/chat/completions",
            {"model": "MODEL", "messages": [{"role": "user", "content": "x " * 400}]},
            400,
            "messages",
        ),
        ("/v1/nothing-here", {}, 404, None),
    ],
)
def test_hostile_requests_get_openai_errors(server, path, body, status, param) -> None:
    srv, llm = server
    if isinstance(body, dict) and body.get("model") == "MODEL":
        body = {**body, "model": model_name(llm)}
    err = assert_openai_error(post(srv, path, body), status, param=param)
    if status == 404 and path != "/v1/nothing-here":
        assert err["code"] == "model_not_found"
    # the server is still fine
    assert httpx.get(srv.url + "/health").status_code == 200


def test_openai_client_sees_typed_errors(server) -> None:
    srv, llm = server
    c = client_of(srv)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        c.completions.create(model=model_name(llm), prompt="x", max_tokens=100_000)


def test_client_disconnect_mid_stream_aborts_the_request(server, monkeypatch) -> None:
    srv, llm = server
    slow_down(llm, monkeypatch)
    wait_idle(llm)
    llm.engine.make_stats()
    body = {
        "model": model_name(llm),
        "prompt": [5, 6, 7],
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[len("data: ") :])["object"] == "text_completion"
    # closed after the first chunk: the engine drops the request long before 200 tokens
    wait_idle(llm)
    stats = llm.engine.make_stats()
    assert stats.num_requests_aborted == 1 and stats.num_requests_finished == 0
    assert_no_leak(llm)


def test_client_disconnect_while_waiting_for_a_full_response(server, monkeypatch) -> None:
    srv, llm = server
    slow_down(llm, monkeypatch)
    wait_idle(llm)
    llm.engine.make_stats()
    body = {"model": model_name(llm), "prompt": [5, 6, 7], "max_tokens": 240, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json=body, timeout=0.3)
    wait_idle(llm)
    stats = llm.engine.make_stats()
    assert stats.num_requests_aborted == 1 and stats.num_requests_finished == 0


def test_metrics_publish_engine_and_component_series(server) -> None:
    srv, llm = server
    client_of(srv).completions.create(
        model=model_name(llm),
        prompt=[5, 6],
        max_tokens=4,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    text = httpx.get(srv.url + "/metrics").text
    for name in (
        "sagellm_time_to_first_token_seconds_bucket",
        "sagellm_time_per_output_token_seconds_bucket",
        "sagellm_generation_throughput_tokens_per_second",
        "sagellm_num_requests_waiting",
        "sagellm_num_requests_running",
        "sagellm_kv_blocks_used",
        "sagellm_kv_blocks_free",
        "sagellm_num_preemptions_total",
        "sagellm_kv_pool_num_blocks",
        "sagellm_scheduler_num_steps_total",
        "sagellm_engine_num_generation_tokens_total",
    ):
        assert name in text, name


def test_internal_failures_are_500s_without_details(server, monkeypatch) -> None:
    srv, llm = server
    wait_idle(llm)

    def broken(plan):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(llm.engine.runtime, "execute", broken)
    body = {"model": model_name(llm), "prompt": [5, 6], "max_tokens": 4}
    err = assert_openai_error(post(srv, "/v1/completions", body), 500)
    assert err["type"] == "internal_server_error"
    assert "secret" not in err["message"]
    with httpx.stream(
        "POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=30
    ) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert error["type"] == "internal_server_error" and "secret" not in error["message"]
    monkeypatch.undo()
    # the engine recovered: the next request is served
    resp = client_of(srv).completions.create(model=model_name(llm), prompt=[5, 6], max_tokens=2)
    assert resp.usage.completion_tokens == 2
