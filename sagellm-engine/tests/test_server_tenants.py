"""API keys, tenants, cache_salt, per-tenant limits, body size and unknown fields."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from sagellm.core.errors import ConfigError
from sagellm.engine.async_engine import AsyncLLMEngine
from sagellm.engine.cli import build_parser, server_config_from_args
from sagellm.engine.config import APIKey, ServerConfig, api_keys_from, load_api_keys_file
from sagellm.engine.server import ServerThread, build_app
from sagellm.engine.server.protocol import ChatCompletionRequest, unknown_fields
from sagellm.engine.server.rate_limiter import Admission, RateLimiter, Refusal
from sagellm.engine.server.tenants import Tenant, Tenants

from .conftest import assert_no_leak, make_llm, slow_down, wait_idle

ALPHA, BETA, GAMMA, DERIVED = (
    "sk-alpha-7f3a9c1e",
    "sk-beta-51e2d0aa",
    "sk-gamma-c0ffee42",
    "sk-derived-b16b00b5",
)
ALL_KEYS = (ALPHA, BETA, GAMMA, DERIVED)
KEYS = (
    APIKey(key=ALPHA, tenant="alpha"),
    APIKey(key=BETA, tenant="beta", priority=3, max_concurrent_requests=2),
    APIKey(key=GAMMA, tenant="gamma", max_tokens_per_minute=100),
    APIKey(key=DERIVED),
)
DERIVED_TENANT = "key-" + hashlib.sha256(DERIVED.encode()).hexdigest()[:8]


def unauthorized(message: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


# ---------------------------------------------------------------------- units


def test_tenants_check_bearer_keys_and_derive_names() -> None:
    tenants = Tenants(ServerConfig(api_keys=KEYS, tenant_max_concurrent_requests=7))
    assert tenants.requires_key
    assert tenants.authenticate(f"Bearer {ALPHA}") == Tenant("alpha", None, 7, None)
    assert tenants.authenticate(f"bearer  {BETA} ") == Tenant("beta", 3, 2, None)
    assert tenants.authenticate(f"Bearer {GAMMA}") == Tenant("gamma", None, 7, 100)
    assert tenants.authenticate(f"Bearer {DERIVED}") == Tenant(DERIVED_TENANT, None, 7, None)
    assert DERIVED not in DERIVED_TENANT
    for bad in (None, "", "Bearer", "Bearer ", ALPHA, f"Basic {ALPHA}", f"Bearer {ALPHA}x"):
        assert tenants.authenticate(bad) is None, bad
    assert tenants.names == ["alpha", "beta", "gamma", DERIVED_TENANT]
    open_server = Tenants(ServerConfig(tenant_max_tokens_per_minute=50))
    assert not open_server.requires_key
    assert open_server.authenticate(None) == Tenant("", None, None, 50)


def test_server_config_rejects_repeated_keys_and_disagreeing_tenants() -> None:
    with pytest.raises(ValueError, match="API key #2 repeats an earlier key") as info:
        ServerConfig(api_keys=[ALPHA, ALPHA])
    assert ALPHA not in str(info.value)
    with pytest.raises(ValueError, match="other limits than an earlier key") as info:
        ServerConfig(
            api_keys=[
                APIKey(key=ALPHA, tenant="t", max_concurrent_requests=1),
                APIKey(key=BETA, tenant="t", max_concurrent_requests=2),
            ]
        )
    with pytest.raises(ValueError, match="without whitespace") as info:
        ServerConfig(api_keys=["sk secret"])
    assert "sk secret" not in str(info.value)
    assert ALPHA not in repr(ServerConfig(api_keys=KEYS))


def test_rate_limiter_windows_tokens_and_counts_requests() -> None:
    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    tenant = Tenant("t", None, 2, 100)
    a = limiter.acquire(tenant, 60)
    assert isinstance(a, Admission)
    now[0] += 10
    refused = limiter.acquire(tenant, 50)
    # 60 + 50 > 100: wait until the first charge leaves the window (at 1060)
    assert refused == Refusal(
        "tokens",
        "Rate limit reached on tokens per minute: limit 100, used 60, requested 50. "
        "Please try again in 50s.",
        50,
    )
    b = limiter.acquire(tenant, 40)
    assert isinstance(b, Admission)
    assert limiter.num_window_tokens("t") == 100
    too_many = limiter.acquire(tenant, 0)
    assert isinstance(too_many, Refusal) and too_many.kind == "requests"
    assert too_many.retry_after_s == 1
    assert "at most 2 concurrent requests" in too_many.message
    a.release(num_used_tokens=20)  # stopped early: 40 tokens come back
    assert limiter.num_window_tokens("t") == 60
    a.release()  # idempotent
    assert limiter.num_running("t") == 1
    c = limiter.acquire(tenant, 40)
    assert isinstance(c, Admission)
    huge = limiter.acquire(Tenant("t", None, None, 100), 101)
    assert isinstance(huge, Refusal) and huge.kind == "tokens" and huge.retry_after_s == 60
    assert huge.message.startswith("Request too large: it needs 101 tokens")
    now[0] += 60  # a's charge (at 1000) and b's (1010) expire; c's (1010) too
    assert limiter.num_window_tokens("t") == 0
    b.release(num_used_tokens=1)  # expired already: nothing to give back
    c.release()
    assert limiter.num_running("t") == 0 and limiter.num_window_tokens("t") == 0
    # unlimited tenants are counted but never refused
    free = Tenant("free")
    slots = [limiter.acquire(free, 10**9) for _ in range(100)]
    assert all(isinstance(s, Admission) for s in slots)
    assert limiter.num_running("free") == 100
    for s in slots:
        assert isinstance(s, Admission)
        s.release()
    assert limiter.num_running("free") == 0


def test_unknown_fields_lists_paths_never_values() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "x", "nmae": "secret-value"},
            {"role": "user", "content": [{"type": "text", "text": "y", "colour": 1}]},
            {"role": "user", "content": "z", "nmae": "again"},
        ],
        "stream_options": {"include_usage": True, "bogus": 2},
        "chat_template_kwargs": {"anything": 1},
        "min_tokens": 3,
        "cache_salt": "s",
    }
    assert unknown_fields(ChatCompletionRequest, body) == [
        "messages[].nmae",
        "messages[].content[].colour",
        "stream_options.bogus",
        "min_tokens",
    ]


def test_keys_files_in_every_format(tmp_path) -> None:
    (tmp_path / "keys.json").write_text(
        json.dumps({ALPHA: {"tenant": "alpha", "max_tokens_per_minute": 5}, BETA: None})
    )
    (tmp_path / "keys.yaml").write_text(
        f"{ALPHA}: {{tenant: alpha, priority: 2, max_concurrent_requests: 3}}\n{BETA}: beta\n"
    )
    (tmp_path / "keys.txt").write_text(f"# comment\n{ALPHA} alpha\n\n{BETA}  # no tenant\n")
    expected = {
        "keys.json": [
            APIKey(key=ALPHA, tenant="alpha", max_tokens_per_minute=5),
            APIKey(key=BETA),
        ],
        "keys.yaml": [
            APIKey(key=ALPHA, tenant="alpha", priority=2, max_concurrent_requests=3),
            APIKey(key=BETA, tenant="beta"),
        ],
        "keys.txt": [APIKey(key=ALPHA, tenant="alpha"), APIKey(key=BETA)],
    }
    for name, keys in expected.items():
        got = load_api_keys_file(tmp_path / name)
        assert [(k.key.get_secret_value(), k.model_dump(exclude={"key"})) for k in got] == [
            (k.key.get_secret_value(), k.model_dump(exclude={"key"})) for k in keys
        ], name


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.txt", "# nothing\n", "holds no key"),
        ("three.txt", f"{ALPHA} alpha extra\n", "line 1: expected 'key' or 'key tenant'"),
        ("bad.json", f'{{"{ALPHA}": ', "is not valid JSON (line 1"),
        ("field.yaml", f"{ALPHA}: {{tenant: a, tennant: b}}\n", "key #1: unknown field"),
        ("limit.yaml", f"{ALPHA}: {{max_tokens_per_minute: 0}}\n", "max_tokens_per_minute"),
        ("list.json", json.dumps({ALPHA: [1]}), "key #1: expected a tenant name"),
    ],
)
def test_bad_keys_files_name_the_place_not_the_key(tmp_path, name, text, message) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_api_keys_file(tmp_path / name)
    assert ALPHA not in str(info.value)


def test_serve_flags_and_environment(tmp_path) -> None:
    parser = build_parser()
    (tmp_path / "keys.txt").write_text(f"{GAMMA} gamma\n")
    args = parser.parse_args(
        [
            "serve",
            "--api-key",
            ALPHA,
            "--api-key",
            BETA,
            "--api-keys-file",
            str(tmp_path / "keys.txt"),
            "--metrics-public",
            "--max-request-body-bytes",
            "1000",
            "--tenant-max-concurrent-requests",
            "4",
            "--tenant-max-tokens-per-minute",
            "9000",
            "--strict-request-fields",
        ]
    )
    config = server_config_from_args(args, environ={"SAGELLM_API_KEY": DERIVED})
    assert [k.key.get_secret_value() for k in config.api_keys] == [ALPHA, BETA, GAMMA]
    assert [k.tenant_name() for k in config.api_keys][2] == "gamma"
    assert config.metrics_public and config.strict_request_fields
    assert config.max_request_body_bytes == 1000
    assert (config.tenant_max_concurrent_requests, config.tenant_max_tokens_per_minute) == (
        4,
        9000,
    )
    # without --api-key the variable is the key; without either the server is open
    plain = parser.parse_args(["serve"])
    env_keys = server_config_from_args(plain, environ={"SAGELLM_API_KEY": DERIVED}).api_keys
    assert [k.key.get_secret_value() for k in env_keys] == [DERIVED]
    assert server_config_from_args(plain, environ={}).api_keys == ()
    assert api_keys_from((), None, environ={"SAGELLM_API_KEY": ""}) == ()
    with pytest.raises(ConfigError, match="--api-key #1"):
        api_keys_from(["has space"], environ={})
    with pytest.raises(ConfigError, match="--max-request-body-bytes"):
        server_config_from_args(
            parser.parse_args(["serve", "--max-request-body-bytes", "0"]), environ={}
        )


# ---------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return make_llm(tiny_model, num_blocks=512, max_num_seqs=64, max_num_batched_tokens=512)


@contextlib.contextmanager
def serving(llm, **options: Any) -> Iterator[ServerThread]:
    config = ServerConfig(port=0, **options)
    with ServerThread(build_app(AsyncLLMEngine(llm.engine), config), config) as srv:
        yield srv
    assert_no_leak(llm, timeout=10.0)


@pytest.fixture(scope="module")
def keyed(tiny):
    with serving(tiny, api_keys=KEYS, log_level="info") as srv:
        yield srv, tiny


@pytest.fixture
def server(keyed):
    srv, llm = keyed
    yield srv, llm
    limiter = srv.app.state.server.limiter
    for name in ("alpha", "beta", "gamma", DERIVED_TENANT):
        assert limiter.num_running(name) == 0, name
    assert_no_leak(llm, timeout=10.0)


def client(srv, key: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60, **kwargs)


def keyless_client(srv) -> openai.OpenAI:
    """The openai client with its Authorization header taken off on the wire."""

    def drop_auth(request: httpx.Request) -> None:
        del request.headers["authorization"]

    http = httpx.Client(event_hooks={"request": [drop_auth]})
    return client(srv, "unused", http_client=http)


def complete(c: openai.OpenAI, llm, **kwargs: Any) -> Any:
    args = {"model": llm.engine.model_name, "prompt": [5, 6, 7], "max_tokens": 4}
    return c.completions.create(**{**args, **kwargs})


def post(srv, path: str, body: Any, key: str | None = None, **headers: str) -> httpx.Response:
    hdrs = {"content-type": "application/json", **headers}
    if key is not None:
        hdrs["authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + path, content=data, headers=hdrs, timeout=60)


def test_openai_client_needs_the_right_key(server) -> None:
    srv, llm = server
    for c in (keyless_client(srv), client(srv, "sk-wrong"), client(srv, ALPHA + "0")):
        with pytest.raises(openai.AuthenticationError):
            complete(c, llm)
        with pytest.raises(openai.AuthenticationError):
            complete(c, llm, stream=True)
        with pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(
                model=llm.engine.model_name, messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    for key in ALL_KEYS:
        c = client(srv, key)
        assert complete(c, llm).usage.completion_tokens == 4
        chunks = list(complete(c, llm, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 4
        chat = list(
            c.chat.completions.create(
                model=llm.engine.model_name,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=3,
                stream=True,
            )
        )
        assert chat[0].choices[0].delta.role == "assistant"
        assert [m.id for m in c.models.list().data] == [llm.engine.model_name]


def test_401_bodies_headers_and_open_routes(server) -> None:
    srv, llm = server
    body = {"model": llm.engine.model_name, "prompt": [5], "max_tokens": 1}
    resp = post(srv, "/v1/completions", body)
    assert resp.status_code == 401
    assert resp.json() == unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
    assert resp.headers["www-authenticate"] == "Bearer"
    for auth in ("Bearer sk-nope", f"Basic {ALPHA}", "Bearer"):
        resp = post(srv, "/v1/completions", body, authorization=auth)
        assert resp.status_code == 401
        assert resp.json() == unauthorized("invalid API key")
    # every /v1 path, known or not, needs the key; with it an unknown path is a 404
    assert httpx.get(srv.url + "/v1/nothing-here").status_code == 401
    found = httpx.get(srv.url + "/v1/nothing-here", headers={"authorization": f"Bearer {ALPHA}"})
    assert found.status_code == 404
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    assert httpx.get(srv.url + "/version").status_code == 200
    metrics = httpx.get(srv.url + "/metrics")
    assert metrics.status_code == 401 and metrics.json() == unauthorized(
        "missing API key: send it as 'Authorization: Bearer <key>'"
    )
    metrics = httpx.get(srv.url + "/metrics", headers={"authorization": f"Bearer {BETA}"})
    assert metrics.status_code == 200 and "sagellm_num_requests_running" in metrics.text


def test_metrics_public_opens_metrics_only(tiny) -> None:
    with serving(tiny, api_keys=[ALPHA], metrics_public=True) as srv:
        assert httpx.get(srv.url + "/metrics").status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401


def test_tenant_salt_and_priority_reach_the_engine(server, monkeypatch) -> None:
    srv, llm = server
    engine = srv.app.state.server.engine
    seen: list[dict[str, Any]] = []
    real = engine.add_request

    async def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append({k: kwargs[k] for k in ("tenant", "cache_salt", "priority")})
        return await real(*args, **kwargs)

    monkeypatch.setattr(engine, "add_request", spy)
    complete(client(srv, ALPHA), llm)
    complete(client(srv, ALPHA), llm, extra_body={"cache_salt": "conversation-1"})
    complete(client(srv, BETA), llm)  # the key's priority is the default
    complete(client(srv, BETA), llm, extra_body={"priority": -1, "cache_salt": "s"})
    complete(client(srv, DERIVED), llm)
    client(srv, GAMMA).chat.completions.create(
        model=llm.engine.model_name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_body={"cache_salt": "chat-salt"},
    )
    assert seen == [
        {"tenant": "alpha", "cache_salt": "", "priority": 0},
        {"tenant": "alpha", "cache_salt": "conversation-1", "priority": 0},
        {"tenant": "beta", "cache_salt": "", "priority": 3},
        {"tenant": "beta", "cache_salt": "s", "priority": -1},
        {"tenant": DERIVED_TENANT, "cache_salt": "", "priority": 0},
        {"tenant": "gamma", "cache_salt": "chat-salt", "priority": 0},
    ]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("salt", ["", "x" * 257, 5, ["a"], {"a": 1}])
def test_bad_cache_salt_is_a_400_naming_it(server, path, salt) -> None:
    srv, llm = server
    body: dict[str, Any] = {"model": llm.engine.model_name, "max_tokens": 1, "cache_salt": salt}
    if path == "/v1/completions":
        body["prompt"] = [5, 6]
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    resp = post(srv, path, body, ALPHA)
    assert resp.status_code == 400
    assert resp.json() == {
        "error": {
            "message": "cache_salt: cache_salt must be a non-empty string of at most 256 "
            "characters",
            "type": "invalid_request_error",
            "param": "cache_salt",
            "code": None,
        }
    }


def test_longest_cache_salt_is_accepted(server) -> None:
    srv, llm = server
    body = {"model": llm.engine.model_name, "prompt": [5], "max_tokens": 1, "cache_salt": "x" * 256}
    assert post(srv, "/v1/completions", body, ALPHA).status_code == 200


def test_32_clients_of_two_tenants_the_limited_one_gets_429s(server, monkeypatch) -> None:
    srv, llm = server
    slow_down(llm, monkeypatch, 0.02)  # each request outlives the others' arrival
    wait_idle(llm)
    model = llm.engine.model_name
    start = threading.Barrier(32)

    def ask(i: int) -> httpx.Response:
        key = BETA if i % 2 else ALPHA
        body = {"model": model, "prompt": [5 + i, 6, 7], "max_tokens": 6, "ignore_eos": True}
        start.wait()
        return post(srv, "/v1/completions", body, key)

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(ask, range(32)))
    alpha = [r for i, r in enumerate(responses) if i % 2 == 0]
    beta = [r for i, r in enumerate(responses) if i % 2]
    assert [r.status_code for r in alpha] == [200] * 16
    assert all(r.json()["usage"]["completion_tokens"] == 6 for r in alpha)
    served = [r for r in beta if r.status_code == 200]
    limited = [r for r in beta if r.status_code == 429]
    assert len(served) + len(limited) == 16
    assert len(served) >= 2 and len(limited) >= 1
    for r in limited:
        assert r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded"
        assert err["param"] is None
        assert err["message"].startswith("Rate limit reached: at most 2 concurrent requests")
    monkeypatch.undo()
    wait_idle(llm)
    assert_no_leak(llm)
    scheduler = llm.engine.scheduler
    assert scheduler.num_waiting == 0 and scheduler.num_running == 0


def test_tokens_per_minute_refusals_carry_retry_after(tiny) -> None:
    keys = [APIKey(key=GAMMA, tenant="gamma", max_tokens_per_minute=100), ALPHA]
    with serving(tiny, api_keys=keys) as srv:  # a fresh window
        c = client(srv, GAMMA)
        # 10 prompt tokens + 50 = 60 of gamma's 100 per minute
        resp = complete(c, tiny, prompt=[5] * 10, max_tokens=50, extra_body={"ignore_eos": True})
        assert resp.usage.total_tokens == 60
        with pytest.raises(openai.RateLimitError) as info:
            complete(c, tiny, prompt=[5] * 10, max_tokens=50)
        response = info.value.response
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) in (59, 60)
        err = response.json()["error"]
        assert (err["type"], err["code"], err["param"]) == ("tokens", "rate_limit_exceeded", None)
        assert err["message"].startswith(
            "Rate limit reached on tokens per minute: limit 100, used 60, requested 60."
        )
        with pytest.raises(openai.RateLimitError, match="Request too large"):
            complete(c, tiny, prompt=[5] * 10, max_tokens=200)
        # 40 tokens are left: a request charged 30 still fits; alpha is not limited at all
        resp = complete(c, tiny, prompt=[5] * 10, max_tokens=20, extra_body={"ignore_eos": True})
        assert resp.usage.total_tokens == 30
        assert srv.app.state.server.limiter.num_window_tokens("gamma") == 90
        assert complete(client(srv, ALPHA), tiny, max_tokens=100).usage.prompt_tokens == 3


def test_slots_come_back_after_disconnects_and_errors(server, monkeypatch) -> None:
    srv, llm = server
    limiter = srv.app.state.server.limiter
    slow_down(llm, monkeypatch)
    wait_idle(llm)
    body = {
        "model": llm.engine.model_name,
        "prompt": [5, 6, 7],
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"authorization": f"Bearer {BETA}"}
    for _ in range(3):  # more streams than beta's 2 slots, one after the other
        with httpx.stream(
            "POST", srv.url + "/v1/completions", json=body, headers=headers, timeout=30
        ) as resp:
            assert resp.status_code == 200
            next(line for line in resp.iter_lines() if line.startswith("data: "))
        wait_idle(llm)
    with pytest.raises(httpx.ReadTimeout):  # non-streaming, client gone
        httpx.post(
            srv.url + "/v1/completions",
            json={**body, "stream": False},
            headers=headers,
            timeout=0.3,
        )
    wait_idle(llm)
    deadline = time.monotonic() + 5
    while limiter.num_running("beta") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert limiter.num_running("beta") == 0
    monkeypatch.undo()
    # a request the engine refuses (token id outside the vocabulary) frees its slot too
    for _ in range(3):
        resp = post(srv, "/v1/completions", {**body, "prompt": [10**6], "stream": False}, BETA)
        assert resp.status_code == 400
    assert limiter.num_running("beta") == 0
    assert complete(client(srv, BETA), llm).usage.completion_tokens == 4


def test_keys_are_never_logged(tiny, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    sent = (*ALL_KEYS, "sk-wrong-key-xyz", ALPHA[:-1])
    with serving(tiny, api_keys=KEYS, log_level="debug") as srv:
        # after the start: uvicorn's logging config replaces its loggers' handlers
        loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error")]
        for lg in loggers:
            lg.addHandler(caplog.handler)
        try:
            model = tiny.engine.model_name
            body = {"model": model, "prompt": [5], "max_tokens": 1, "bogus_field": ALPHA}
            for key in sent:
                post(srv, "/v1/completions", body, key)
                post(srv, "/v1/completions", {**body, "max_tokens": "x"}, key)
                httpx.get(srv.url + "/metrics", headers={"authorization": f"Bearer {key}"})
            post(srv, "/v1/completions", body, authorization=f"Basic {BETA}")
        finally:
            for lg in loggers:
                lg.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    assert any("bogus_field" in m for m in messages)
    assert any("no valid API key" in m for m in messages)
    assert any(r.name == "uvicorn.access" and "401" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + (record.exc_text or "")
        for key in sent:
            assert key not in text, record.getMessage()


def test_unknown_fields_are_logged_by_name(server, caplog) -> None:
    srv, llm = server
    caplog.set_level(logging.WARNING, logger="sagellm.engine.server.app")
    body = {
        "model": llm.engine.model_name,
        "prompt": [5, 6],
        "max_tokens": 2,
        "min_tokens": 1,
        "vllm_xargs": {"secret": "value-1234"},
        "stream_options": {"include_usage": False, "continuous_usage_stats": True},
    }
    assert post(srv, "/v1/completions", body, ALPHA).status_code == 200
    (record,) = [r for r in caplog.records if "ignores" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "a request to /v1/completions has fields this server ignores: min_tokens, "
        "vllm_xargs, stream_options.continuous_usage_stats"
    )
    assert "value-1234" not in record.getMessage()


def test_strict_request_fields_reject_unknown_fields(tiny) -> None:
    with serving(tiny, strict_request_fields=True) as srv:
        model = tiny.engine.model_name
        body = {"model": model, "prompt": [5], "max_tokens": 1, "min_tokens": 1, "top_a": 2}
        resp = post(srv, "/v1/completions", body)
        assert resp.status_code == 400
        assert resp.json() == {
            "error": {
                "message": "Unrecognized request arguments supplied: min_tokens, top_a (this "
                "server rejects unknown fields)",
                "type": "invalid_request_error",
                "param": "min_tokens",
                "code": "unknown_field",
            }
        }
        chat = {
            "model": model,
            "messages": [{"role": "user", "content": "hi", "nmae": "x"}],
            "max_tokens": 1,
        }
        err = post(srv, "/v1/chat/completions", chat).json()["error"]
        assert err["param"] == "messages[].nmae"
        known = {"model": model, "prompt": [5], "max_tokens": 1, "cache_salt": "s"}
        assert post(srv, "/v1/completions", known).status_code == 200


TOO_LARGE = {
    "error": {
        "message": "the request body is larger than this server's limit of 8388608 bytes",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }
}


def test_a_10_mb_body_is_a_413(server) -> None:
    srv, llm = server
    big = json.dumps(
        {"model": llm.engine.model_name, "prompt": "x" * (10 << 20), "max_tokens": 1}
    ).encode()
    resp = post(srv, "/v1/completions", big, ALPHA)
    assert resp.status_code == 413 and resp.json() == TOO_LARGE

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    resp = httpx.post(
        srv.url + "/v1/chat/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {ALPHA}", "content-type": "application/json"},
        timeout=60,
    )
    assert resp.status_code == 413 and resp.json() == TOO_LARGE
    assert httpx.get(srv.url + "/health").status_code == 200


def test_413_comes_before_the_body_is_sent(server) -> None:
    srv, _ = server
    with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {ALPHA}\r\n".encode()
            + f"Content-Length: {10 << 20}\r\n\r\n".encode()
            + b'{"model": '
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413 ")


def test_the_body_limit_is_configurable(tiny) -> None:
    with serving(tiny, max_request_body_bytes=200) as srv:
        model = tiny.engine.model_name
        body = {"model": model, "max_tokens": 1, "prompt": ""}
        body["prompt"] = "a" * (200 - len(json.dumps(body)))
        assert len(json.dumps(body)) == 200
        assert post(srv, "/v1/completions", body).status_code == 200
        body["prompt"] += "a"
        resp = post(srv, "/v1/completions", body)
        assert resp.status_code == 413
        assert resp.json()["error"]["message"] == (
            "the request body is larger than this server's limit of 200 bytes"
        )


def test_tokenization_does_not_block_other_clients(server, monkeypatch) -> None:
    srv, llm = server
    tok = llm.tokenizer
    real = tok.encode

    def slow_encode(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.5)  # a huge prompt, as the event loop would feel it
        return real(*args, **kwargs)

    monkeypatch.setattr(tok, "encode", slow_encode)
    result: list[httpx.Response] = []
    body = {"model": llm.engine.model_name, "prompt": "hello world", "max_tokens": 1}
    worker = threading.Thread(
        target=lambda: result.append(post(srv, "/v1/completions", body, ALPHA))
    )
    worker.start()
    time.sleep(0.3)  # the completion is tokenizing now
    t0 = time.perf_counter()
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    assert time.perf_counter() - t0 < 0.5
    worker.join()
    assert result[0].status_code == 200
