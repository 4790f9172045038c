"""The control plane: policies, prefix trees, health, and ``sagellm router`` over real servers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.core.ports import find_free_port
from sagellm.core.types import CapabilityDescriptor, RequestOutput, SamplingParams
from sagellm.engine.async_engine import AsyncLLMEngine
from sagellm.engine.cli import build_parser
from sagellm.engine.config import ServerConfig
from sagellm.engine.router import (
    CacheAwarePolicy,
    ControlPlaneManager,
    HealthPolicy,
    HTTPRouter,
    LeastLoadPolicy,
    NoHealthyWorkerError,
    PrefixTree,
    RoundRobinPolicy,
    RouterConfig,
    RouteRequest,
    RouterThread,
    UnknownModelError,
    Worker,
    WorkerPool,
)
from sagellm.engine.router.app import parse_load
from sagellm.engine.router.policies import (
    DEVICE_HEADER,
    TTFT_HEADER,
    SLOPolicy,
    make_policy,
    request_text,
)
from sagellm.engine.router.prefix_tree import common_prefix_len
from sagellm.engine.router.workers import parse_worker_spec, split_device
from sagellm.engine.server import ServerThread, build_app

from .conftest import make_llm

# ---------------------------------------------------------------------- helpers


def workers(n: int, model: str = "m") -> list[Worker]:
    return [Worker(name=f"w{i}", url=f"http://w{i}", models={model: 1024}) for i in range(n)]


def req(text: str, model: str = "m") -> RouteRequest:
    return RouteRequest(model=model, text=text)


def wait_for(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` (connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------- policies


def test_round_robin_cycles_over_the_eligible_workers() -> None:
    ws = workers(3)
    p = RoundRobinPolicy()
    assert [p.choose(req("x"), ws).name for _ in range(7)] == [
        "w0", "w1", "w2", "w0", "w1", "w2", "w0"
    ]  # fmt: skip
    assert p.choose(req("x"), ws[:2]).name == "w1"  # counter 7 over two workers


def test_least_load_takes_the_fewest_in_flight_then_the_first() -> None:
    ws = workers(3)
    p = LeastLoadPolicy()
    assert p.choose(req("x"), ws).name == "w0"
    ws[0].in_flight = 2
    ws[1].in_flight = 1
    ws[2].in_flight = 1
    assert p.choose(req("x"), ws).name == "w1"
    ws[1].set_reported_load(5)  # the worker says it runs more (other clients)
    assert ws[1].load == 5
    assert p.choose(req("x"), ws).name == "w2"
    ws[2].set_reported_load(0)  # a report below the router's own count is not trusted
    assert ws[2].load == 1


def test_cache_aware_sends_a_conversation_back_to_its_worker() -> None:
    ws = workers(2)
    p = CacheAwarePolicy(cache_threshold=0.3, balance_abs_threshold=64)
    sys_a, sys_b = "A" * 100, "B" * 100
    seq = [
        sys_a + "q1",  # miss: both trees empty -> w0 (ties: smallest tree, then first)
        sys_b + "q1",  # miss: nothing matches -> w1 (smaller tree)
        sys_a + "q1 a1 q2",  # hit on w0
        sys_b + "q1 a1 q2",  # hit on w1
        sys_a + "other",  # 100/105 of the text matches w0's tree
        "C" * 10,  # miss -> least loaded, smaller tree: w0 holds 117 chars, w1 110
    ]
    got = []
    for text in seq:
        got.append((p.choose(req(text), ws).name, p.last_decision))
    assert got == [
        ("w0", "cache_miss"),
        ("w1", "cache_miss"),
        ("w0", "cache_hit"),
        ("w1", "cache_hit"),
        ("w0", "cache_hit"),
        ("w1", "cache_miss"),
    ]


def test_cache_aware_threshold_and_load_fallback() -> None:
    ws = workers(2)
    p = CacheAwarePolicy(cache_threshold=0.5)
    p.choose(req("abcdefghij"), ws)  # -> w0
    # 4 of 10 characters match w0: below 0.5, so the least loaded (w1, smaller tree)
    assert p.choose(req("abcdZZZZZZ"), ws).name == "w1"
    assert p.last_decision == "cache_miss"
    ws[1].in_flight = 3
    # a miss goes to the least loaded even when its tree is bigger
    assert p.choose(req("qqqqqqqqqq"), ws).name == "w0"


def test_cache_aware_imbalance_goes_to_the_least_loaded() -> None:
    ws = workers(2)
    p = CacheAwarePolicy(balance_abs_threshold=4, balance_rel_threshold=1.5)
    assert p.choose(req("shared prefix 1"), ws).name == "w0"
    ws[0].in_flight = 5  # 5 - 0 > 4 and 5 > 0 * 1.5: imbalanced
    assert p.choose(req("shared prefix 2"), ws).name == "w1"
    assert p.last_decision == "imbalanced"
    ws[1].in_flight = 2  # 5 - 2 = 3 is not > 4: balanced again, the cache decides
    assert p.choose(req("shared prefix 1, more"), ws).name == "w0"
    assert p.last_decision == "cache_hit"
    ws[0].in_flight, ws[1].in_flight = 100, 80  # abs 20 > 4 but 100 < 80 * 1.5
    assert not p.imbalanced(ws)


def test_cache_aware_forgets_a_removed_worker() -> None:
    ws = workers(2)
    pool = WorkerPool(CacheAwarePolicy())
    for w in ws:
        pool.add(w)
    pool.select(req("hello world"))
    assert "w0" in pool.policy.trees  # type: ignore[attr-defined]
    pool.remove("w0")
    assert "w0" not in pool.policy.trees  # type: ignore[attr-defined]
    assert pool.select(req("hello world")).name == "w1"


def test_request_text_of_chat_extends_with_every_turn() -> None:
    turn1 = {
        "model": "m",
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}],
    }
    turn2 = {"model": "m", "messages": [*turn1["messages"], {"role": "assistant", "content": "a1"}, {"role": "user", "content": [{"type": "text", "text": "q2"}]}]}  # fmt: skip
    t1, t2 = request_text(turn1), request_text(turn2)
    assert t2.startswith(t1) and t1 == "<|system|>S<|user|>q1"
    assert t2.endswith("<|user|>q2")
    assert request_text({"prompt": [1, 2, 3]}) == "1 2 3"
    assert request_text({"prompt": ["first", "second"]}) == "first"
    r = RouteRequest.from_body({"model": "m", "prompt": [1, 2, 3]})
    assert r.num_prompt_tokens == 3


# ---------------------------------------------------------------------- prefix tree


def test_slo_policy_fits_the_objective_with_the_least_slack() -> None:
    fast, slow = workers(2)
    policy = make_policy("slo")
    assert isinstance(policy, SLOPolicy)
    plain = req("x")
    assert policy.choose(plain, [fast, slow]) is fast and policy.last_decision == "slo_explore"
    policy.observe(fast, 0.1, 0)  # 100 ms per open request
    assert policy.choose(plain, [fast, slow]) is slow  # not measured yet: tried first
    policy.observe(slow, 0.4, 1)  # 400 ms with one other open: 200 ms per request
    assert (policy.predicted_ms(fast), policy.predicted_ms(slow)) == (100.0, 200.0)
    assert policy.choose(plain, [fast, slow]) is fast and policy.last_decision == "slo_none"

    def within(ms: float) -> RouteRequest:
        return RouteRequest(model="m", text="x", ttft_ms=ms)

    # both fit 250 ms: the one with the least slack, keeping the fast one free
    assert policy.choose(within(250), [fast, slow]) is slow
    assert policy.last_decision == "slo_fit"
    assert policy.choose(within(150), [fast, slow]) is fast  # only the fast one fits
    assert policy.choose(within(50), [fast, slow]) is fast  # none fits: the fastest
    assert policy.last_decision == "slo_fastest"
    fast.in_flight = 3  # predicted 400 ms now
    assert policy.choose(within(250), [fast, slow]) is slow
    assert policy.choose(plain, [fast, slow]) is slow  # the lower prediction
    policy.observe(slow, 0.3, 0)  # the mean moves by alpha = 0.2 toward 300 ms
    assert policy.predicted_ms(slow) == pytest.approx(220.0)
    policy.forget(slow)
    assert policy.predicted_ms(slow) is None
    with pytest.raises(ValueError, match="default_ttft_ms must be positive"):
        SLOPolicy(default_ttft_ms=0)
    defaulted = SLOPolicy(default_ttft_ms=150)
    for w, seconds in ((fast, 0.1), (slow, 0.2)):
        defaulted.observe(w, seconds, 0)
    fast.in_flight = 0
    assert defaulted.choose(plain, [fast, slow]) is fast  # 150 ms: only the fast one fits


def test_ttft_header_parsing() -> None:
    body = {"model": "m", "prompt": "hi"}
    assert RouteRequest.from_body(body, {TTFT_HEADER: "250"}).ttft_ms == 250.0
    assert RouteRequest.from_body(body).ttft_ms is None
    for bad in ("0", "-5", "soon", "inf", "nan"):
        with pytest.raises(ValueError, match="must be a positive number of milliseconds"):
            RouteRequest.from_body(body, {TTFT_HEADER: bad})


def test_device_kinds_in_worker_specs_and_requests() -> None:
    assert split_device("http://h:1@m,n#NPU") == ("http://h:1@m,n", "npu")
    assert split_device("http://h:1") == ("http://h:1", None)
    for bad in ("http://h:1#", "http://h:1#a/b"):
        with pytest.raises(ValueError, match="URL\\[@models\\]#kind"):
            split_device(bad)
    cuda, npu, unknown = workers(3)
    cuda.device, npu.device = "cuda", "npu"
    pool = WorkerPool(RoundRobinPolicy())
    for w in (cuda, npu, unknown):
        pool.add(w)
    on = lambda kind: RouteRequest.from_body({"model": "m"}, {DEVICE_HEADER: kind})  # noqa: E731
    assert [pool.select(on("NPU")) for _ in range(2)] == [npu, npu]
    assert pool.select(on("cuda")) is cuda
    with pytest.raises(
        UnknownModelError, match=r"'xpu'; it is served on: cuda, npu \(and 1 worker"
    ):
        pool.select(on("xpu"))
    assert {pool.select(req("x")).name for _ in range(3)} == {"w0", "w1", "w2"}


def test_prefix_tree_basics() -> None:
    t = PrefixTree()
    assert t.match("anything") == 0
    t.insert("hello world")
    t.insert("hello there")
    assert t.match("hello world!") == 11
    assert t.match("hello") == 5
    assert t.match("help") == 3
    assert t.size == len("hello world") + len("there")
    t.insert("hello")  # already a prefix: nothing new
    assert t.size == 16
    assert common_prefix_len("abcdef", "xxabcxx", 2) == 3
    assert common_prefix_len("abc", "abc") == 3


texts = st.lists(st.text(alphabet="abc", max_size=12), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(texts, st.text(alphabet="abcd", max_size=14))
def test_prefix_tree_match_is_the_longest_common_prefix(inserted: list[str], query: str) -> None:
    t = PrefixTree(max_chars=10_000)
    for s in inserted:
        t.insert(s)
    expected = max(common_prefix_len(s, query) for s in inserted)
    assert t.match(query) == expected
    for s in inserted:
        assert t.peek(s) == len(s)
    assert t.size <= sum(len(s) for s in inserted)


@settings(max_examples=150, deadline=None)
@given(texts, st.integers(0, 20), st.text(alphabet="abcd", max_size=14))
def test_prefix_tree_eviction_bounds_the_size(inserted: list[str], limit: int, query: str) -> None:
    t = PrefixTree(max_chars=limit)
    for s in inserted:
        t.insert(s)
        assert t.size <= max(limit, len(s))
        assert t.peek(s) == len(s)  # the newest text survives its own eviction
    # what is left is a prefix of something inserted: never an overestimate
    assert t.match(query) <= max(common_prefix_len(s, query) for s in inserted)
    total = 0
    stack = [t._root]
    while stack:  # the size is the characters on the edges
        n = stack.pop()
        total += len(n.label)
        stack.extend(n.children.values())
    assert total == t.size


def test_prefix_tree_evicts_the_least_recently_used() -> None:
    t = PrefixTree(max_chars=12)
    t.insert("aaaa1111")
    t.insert("bbbb2222")  # 16 > 12: the older text goes
    assert t.peek("aaaa1111") == 0 and t.peek("bbbb2222") == 8
    t = PrefixTree(max_chars=20)
    t.insert("aaaa1111")
    t.insert("bbbb2222")
    t.match("aaaa1111")  # used again: now the newest
    t.insert("cccc3333")
    assert t.peek("aaaa1111") == 8 and t.peek("bbbb2222") == 0 and t.peek("cccc3333") == 8


# ---------------------------------------------------------------------- health, pool


def test_health_state_machine() -> None:
    w = Worker(name="w", health=HealthPolicy(failures=3, successes=2))
    assert w.healthy
    assert not w.record_failure() and not w.record_failure()
    w.record_success()  # resets the failure count
    assert not w.record_failure() and not w.record_failure()
    assert w.record_failure() and not w.healthy  # the third in a row
    assert not w.record_success()
    w.record_failure()  # a failure resets the successes
    assert not w.record_success() and not w.healthy
    assert w.record_success() and w.healthy
    w.mark_down()
    assert not w.healthy and not w.record_success() and w.record_success()


def test_pool_errors_name_the_model_and_the_down_workers() -> None:
    pool = WorkerPool(RoundRobinPolicy())
    for w in workers(2):
        pool.add(w)
    with pytest.raises(UnknownModelError, match=r"'nope' does not exist.*served: m"):
        pool.select(req("x", model="nope"))
    for w in pool.workers:
        w.mark_down()
    with pytest.raises(NoHealthyWorkerError, match=r"2 of 2 down: w0, w1"):
        pool.select(req("x"))
    with pytest.raises(ValueError, match="already registered"):
        pool.add(Worker(name="w0"))


def test_token_prompts_skip_workers_with_a_short_context() -> None:
    pool = WorkerPool(RoundRobinPolicy())
    pool.add(Worker(name="short", models={"m": 4}))
    pool.add(Worker(name="long", models={"m": 64}))
    r = RouteRequest.from_body({"model": "m", "prompt": list(range(10))})
    assert [pool.select(r).name for _ in range(3)] == ["long"] * 3


def test_worker_specs_and_metrics_parsing() -> None:
    assert parse_worker_spec("127.0.0.1:8000") == ("http://127.0.0.1:8000", [])
    assert parse_worker_spec("http://h:1/@a,b") == ("http://h:1", ["a", "b"])
    page = (
        "# HELP sagellm_num_requests_running x\n"
        'sagellm_num_requests_running{model_name="m"} 3.0\n'
        'sagellm_num_requests_waiting{model_name="m"} 2.0\n'
        "sagellm_kv_blocks_used 7\n"
    )
    assert parse_load(page) == 5
    assert parse_load('vllm:num_requests_running{a="b"} 1\nvllm:num_requests_waiting 4\n') == 5
    assert parse_load("other 1\n") is None


def test_cli_router_flags() -> None:
    args = build_parser().parse_args(
        ["router", "--worker-urls", "http://a", "http://b@m", "--policy", "round_robin",
         "--health-failures", "4", "--cache-threshold", "0.5"]
    )  # fmt: skip
    assert args.worker_urls == ["http://a", "http://b@m"] and args.policy == "round_robin"
    assert args.health_failures == 4 and args.health_successes == 2
    assert args.cache_threshold == 0.5 and args.balance_abs_threshold == 64
    assert args.balance_rel_threshold == 1.5 and args.func.__name__ == "cmd_router"


# ---------------------------------------------------------------------- Python API


class FakeEngine:
    """An InferenceEngine that echoes the prompt length as a token."""

    def __init__(self, name: str, healthy: bool = True) -> None:
        self.name, self.healthy, self.calls = name, healthy, 0

    def capabilities(self) -> CapabilityDescriptor:
        return CapabilityDescriptor(name=self.name, max_model_len=128)

    async def generate(
        self, prompt: Any, sampling: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        from sagellm.core.types import CompletionOutput

        self.calls += 1
        out = CompletionOutput(index=0, text=self.name, token_ids=[len(prompt)])
        yield RequestOutput(request_id, None, [], [out], finished=True)

    async def abort(self, request_id: str) -> None:
        pass

    def is_healthy(self) -> bool:
        return self.healthy


def test_control_plane_manager_routes_engines_by_capability() -> None:
    cp = ControlPlaneManager("round_robin")
    a, b, c = FakeEngine("m"), FakeEngine("m"), FakeEngine("other")
    cp.register_engine("a", a)
    cp.register_engine("b", b)
    cp.register_engine("c", c)
    assert [cp.route("m", "hi").name for _ in range(3)] == ["a", "b", "a"]
    assert cp.route("other").name == "c"
    assert cp.workers[0].models == {"m": 128}
    b.healthy = False
    assert [cp.route("m", "hi").name for _ in range(2)] == ["a", "a"]
    with pytest.raises(UnknownModelError):
        cp.route("missing")
    with pytest.raises(UnknownModelError, match="name the model"):
        cp.route(None)
    cp.remove("c")
    assert cp.route(None).name == "a"  # one model left: it is the default

    async def run() -> list[str]:
        texts = []
        for _ in range(2):
            async for out in cp.generate("hello", SamplingParams(max_tokens=1), "r"):
                texts.append(out.outputs[0].text)
        return texts

    assert asyncio.run(run()) == ["m", "m"] and a.calls == 2
    assert cp.workers[0].in_flight == 0


def test_control_plane_manager_with_a_real_engine(tiny_llm: Any) -> None:
    async def run() -> list[int]:
        engine = AsyncLLMEngine(tiny_llm.engine)
        cp = ControlPlaneManager("cache_aware")
        cp.register_engine("e", engine)
        ids: list[int] = []
        try:
            async for out in cp.generate(
                [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), "x"
            ):
                ids = list(out.outputs[0].token_ids)
        finally:
            await engine.shutdown()
        return ids

    ids = asyncio.run(run())
    expect = (
        tiny_llm.generate(
            [[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        )[0]
        .outputs[0]
        .token_ids
    )
    assert ids == list(expect)


# ---------------------------------------------------------------------- HTTP


def start_worker(model_path: Any, port: int = 0) -> ServerThread:
    llm = make_llm(model_path, num_blocks=256, max_num_seqs=16, max_num_batched_tokens=256)
    return ServerThread(build_app(AsyncLLMEngine(llm.engine)), ServerConfig(port=port)).start()


@pytest.fixture(scope="module")
def two_workers(tiny_model: Any) -> Iterator[list[ServerThread]]:
    started: list[ServerThread] = []
    try:
        for _ in range(2):
            started.append(start_worker(tiny_model))
        yield started
    finally:
        for s in started:
            s.stop()
        for s in started:
            assert port_is_free(s.port)


def router_over(urls: list[str], **config: Any) -> RouterThread:
    options = {"health_interval": 0.1, "health_timeout": 2.0, **config}
    return RouterThread(HTTPRouter(urls, RouterConfig(**options))).start()


@pytest.fixture
def routed(two_workers: list[ServerThread]) -> Iterator[tuple[RouterThread, list[ServerThread]]]:
    r = router_over([w.url for w in two_workers], policy="round_robin")
    try:
        yield r, two_workers
    finally:
        r.stop()
    assert port_is_free(r.port)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def model_of(srv: ServerThread) -> str:
    return str(httpx.get(srv.url + "/v1/models").json()["data"][0]["id"])


GREEDY: dict[str, Any] = {"max_tokens": 6, "temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_router_answers_like_a_worker(routed: tuple[RouterThread, list[ServerThread]]) -> None:
    r, ws = routed
    model = model_of(ws[0])
    direct, via = client(ws[0].url), client(r.url)
    assert [m.id for m in via.models.list().data] == [model]
    assert httpx.get(r.url + "/v1/models").json()["data"][0]["max_model_len"] == 256
    want = direct.completions.create(model=model, prompt="hello there", **GREEDY)
    chat_want = direct.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], **GREEDY
    )
    for _ in range(2):  # round robin: once on each worker
        got = via.completions.create(model=model, prompt="hello there", **GREEDY)
        assert got.choices[0].text == want.choices[0].text
        assert got.usage is not None and got.usage.completion_tokens == 6
        streamed = "".join(
            c.choices[0].text
            for c in via.completions.create(
                model=model, prompt="hello there", stream=True, **GREEDY
            )
            if c.choices
        )
        assert streamed == want.choices[0].text
        chat = via.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], **GREEDY
        )
        assert chat.choices[0].message.content == chat_want.choices[0].message.content
        chunks = via.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True, **GREEDY
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == chat_want.choices[0].message.content
    assert httpx.get(r.url + "/health").json()["workers_up"] == 2
    page = httpx.get(r.url + "/metrics").text
    for w in ws:
        line = (
            f'sagellm_router_requests_total{{decision="round_robin",policy="round_robin",'
            f'worker="{w.url}"}} 4.0'
        )
        assert line in page
        assert f'sagellm_router_worker_up{{worker="{w.url}"}} 1.0' in page
        assert f'sagellm_router_requests_in_flight{{worker="{w.url}"}} 0.0' in page


def test_a_client_leaving_a_stream_frees_the_worker(
    routed: tuple[RouterThread, list[ServerThread]],
) -> None:
    r, ws = routed
    body = {"model": model_of(ws[0]), "prompt": "hi", "max_tokens": 200, "stream": True}
    body["ignore_eos"] = True
    with httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=30) as resp:
        first = next(line for line in resp.iter_lines() if line.startswith("data: "))
    assert "choices" in first
    wait_for(lambda: all(w.in_flight == 0 for w in r.router.pool.workers), what="in-flight 0")
    engines = [w.app.state.server.engine for w in ws]
    wait_for(lambda: all(e.num_live_requests == 0 for e in engines), what="aborted upstream")


def test_router_errors(routed: tuple[RouterThread, list[ServerThread]]) -> None:
    r, ws = routed
    resp = httpx.post(r.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'nope' does not exist" in err["message"] and model_of(ws[0]) in err["message"]
    with pytest.raises(openai.NotFoundError):
        client(r.url).completions.create(model="nope", prompt="x", max_tokens=1)
    assert httpx.post(r.url + "/v1/completions", content=b"{").status_code == 400
    assert httpx.post(r.url + "/v1/completions", json={"prompt": "x"}).status_code == 400
    # a worker's own 4xx comes back as it is, without counting as a failure
    resp = httpx.post(
        r.url + "/v1/completions", json={"model": model_of(ws[0]), "prompt": "x", "max_tokens": -1}
    )
    assert resp.status_code == 400 and "error" in resp.json()
    assert all(w.healthy for w in r.router.pool.workers)


def test_all_workers_down_is_503() -> None:
    dead = [f"http://127.0.0.1:{find_free_port()}@tiny" for _ in range(2)]
    r = router_over(dead, policy="least_load", health_interval=0)
    try:
        resp = httpx.post(r.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert resp.status_code == 503
        err = resp.json()["error"]
        assert err["code"] == "no_healthy_worker" and "2 of 2 down" in err["message"]
        assert httpx.get(r.url + "/health").status_code == 503
        assert httpx.get(r.url + "/v1/models").json()["data"][0]["id"] == "tiny"
    finally:
        r.stop()


def routed_count(r: RouterThread, worker: str, decision: str) -> int:
    for line in httpx.get(r.url + "/metrics").text.splitlines():
        if (
            line.startswith("sagellm_router_requests_total")
            and f'worker="{worker}"' in line
            and f'decision="{decision}"' in line
        ):
            return int(float(line.split()[-1]))
    return 0


def test_a_killed_worker_is_taken_out_and_comes_back(
    tiny_model: Any, two_workers: list[ServerThread]
) -> None:
    other = two_workers[1]
    victim = start_worker(tiny_model)
    port = victim.port
    # slow health checks: the request failures alone take the worker out
    r = router_over([victim.url, other.url], policy="round_robin", health_interval=0.5)
    restarted: ServerThread | None = None
    try:
        model = model_of(other)
        via = client(r.url)
        want = via.completions.create(model=model, prompt="abc", **GREEDY).choices[0].text
        victim.stop()
        w_victim = r.router.pool.get(victim.url)
        for _ in range(6):
            got = via.completions.create(model=model, prompt="abc", **GREEDY)
            assert got.choices[0].text == want  # retried on the other worker
            stream = via.completions.create(model=model, prompt="abc", stream=True, **GREEDY)
            assert "".join(c.choices[0].text for c in stream if c.choices) == want
        wait_for(lambda: not w_victim.healthy, what="the victim to be taken out")
        page = httpx.get(r.url + "/metrics").text
        assert f'sagellm_router_worker_up{{worker="{victim.url}"}} 0.0' in page
        assert 'decision="retry"' in page
        restarted = start_worker(tiny_model, port=port)
        wait_for(lambda: w_victim.healthy, what="the victim to come back")
        before = routed_count(r, victim.url, "round_robin")
        for _ in range(4):
            assert via.completions.create(model=model, prompt="abc", **GREEDY).choices[0].text
        assert routed_count(r, victim.url, "round_robin") == before + 2  # its turn again
    finally:
        r.stop()
        victim.stop()
        if restarted is not None:
            restarted.stop()
    assert port_is_free(port) and port_is_free(r.port)


def stub_worker(
    model: str, mode: str, delay: float = 0.0, device: str | None = None
) -> ServerThread:
    """A fake worker: ``fail`` answers 500, ``break`` cuts its stream after one event,
    ``timed`` streams one event after ``delay`` seconds, then ends."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card: dict[str, Any] = {"id": model, "object": "model"}
        if device is not None:
            card["device"] = device
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions", response_model=None)
    async def completions() -> Any:
        if mode == "fail":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)

        async def events() -> AsyncIterator[bytes]:
            await asyncio.sleep(delay)
            yield b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'
            if mode == "timed":
                yield b"data: [DONE]\n\n"
                return
            await asyncio.sleep(0.05)
            raise RuntimeError("the worker died mid-stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    return ServerThread(app, ServerConfig(port=0, log_level="critical")).start()


def test_device_routing_over_http(two_workers: list[ServerThread]) -> None:
    reported = stub_worker("m", "timed", device="CUDA")  # read from its model card
    declared = stub_worker("m", "timed")
    r = router_over([reported.url, declared.url + "#npu"], policy="round_robin")
    body = {"model": "m", "prompt": "hi", "stream": True}
    try:
        assert r.router.pool.get(reported.url).device == "cuda"
        assert r.router.pool.get(declared.url).device == "npu"
        card = httpx.get(r.url + "/v1/models").json()["data"][0]
        assert card["devices"] == ["cuda", "npu"] and "device" not in card
        for kind, url in (("npu", declared.url), ("cuda", reported.url), ("npu", declared.url)):
            before = routed_count(r, url, "round_robin")
            resp = httpx.post(r.url + "/v1/completions", json=body, headers={DEVICE_HEADER: kind})
            assert resp.status_code == 200
            assert routed_count(r, url, "round_robin") == before + 1
        resp = httpx.post(r.url + "/v1/completions", json=body, headers={DEVICE_HEADER: "xpu"})
        assert resp.status_code == 404 and "served on: cuda, npu" in resp.json()["error"]["message"]
    finally:
        r.stop()
        reported.stop()
        declared.stop()
    # a sageLLM server reports the device kind it runs on
    assert httpx.get(two_workers[0].url + "/v1/models").json()["data"][0]["device"] == "cpu"
    cp = ControlPlaneManager("round_robin")
    assert cp.register_url(two_workers[0].url).device == "cpu"


def test_slo_routing_learns_each_worker_s_ttft_over_http() -> None:
    fast, slow = stub_worker("m", "timed", 0.02), stub_worker("m", "timed", 0.3)
    r = router_over([fast.url, slow.url], policy="slo", health_interval=0)
    body = {"model": "m", "prompt": "hi", "stream": True}

    def send(ttft_ms: float | None = None) -> str:
        headers = {} if ttft_ms is None else {TTFT_HEADER: str(ttft_ms)}
        with httpx.stream("POST", r.url + "/v1/completions", json=body, headers=headers) as resp:
            assert resp.status_code == 200
            assert b"[DONE]" in resp.read()
        return str(r.router.policy.last_decision)

    try:
        assert [send(), send()] == ["slo_explore", "slo_explore"]  # each measured once
        predicted = {
            w: r.router.policy.predicted_ms(r.router.pool.get(w)) for w in (fast.url, slow.url)
        }
        assert 20 <= predicted[fast.url] < 250 <= 300 <= predicted[slow.url] < 1000
        before = {w: routed_count(r, w, "slo_fit") for w in (fast.url, slow.url)}
        assert send(5000) == "slo_fit"  # both fit: the slow one (least slack)
        assert send(150) == "slo_fit"  # only the fast one fits
        assert routed_count(r, slow.url, "slo_fit") == before[slow.url] + 1
        assert routed_count(r, fast.url, "slo_fit") == before[fast.url] + 1
        assert send(1) == "slo_fastest"
        resp = httpx.post(r.url + "/v1/completions", json=body, headers={TTFT_HEADER: "soon"})
        assert resp.status_code == 400 and TTFT_HEADER in resp.json()["error"]["message"]
    finally:
        r.stop()
        fast.stop()
        slow.stop()


def test_5xx_is_retried_and_a_broken_stream_ends_with_an_error(
    two_workers: list[ServerThread],
) -> None:
    real = two_workers[0]
    model = model_of(real)
    failing, breaking = stub_worker(model, "fail"), stub_worker(model, "break")
    r = router_over([failing.url, real.url], policy="round_robin", health_interval=0)
    r2 = router_over([breaking.url], policy="round_robin", health_interval=0)
    try:
        for _ in range(2):
            resp = httpx.post(
                r.url + "/v1/completions",
                json={"model": model, "prompt": "abc", "max_tokens": 2},
                timeout=30,
            )
            assert resp.status_code == 200, resp.text
        assert r.router.pool.get(failing.url)._failures >= 1
        with httpx.stream(
            "POST",
            r2.url + "/v1/completions",
            json={"model": model, "prompt": "abc", "stream": True},
            timeout=30,
        ) as resp:
            assert resp.status_code == 200
            events = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[0][6:])["choices"][0]["text"] == "x"
        assert json.loads(events[1][6:])["error"]["code"] == "worker_failed"
        assert events[-1] == "data: [DONE]"
    finally:
        for s in (r, r2, failing, breaking):
            s.stop()


def test_load_scraping_and_register_url(two_workers: list[ServerThread]) -> None:
    urls = [w.url for w in two_workers]
    r = router_over(urls, policy="least_load", scrape_metrics=True)
    try:
        pool = r.router.pool
        wait_for(
            lambda: all(w.reported_load is not None for w in pool.workers),
            what="loads scraped from the workers' /metrics",
        )
        assert [w.reported_load for w in pool.workers] == [0, 0]
        assert [w.models for w in pool.workers] == [{model_of(two_workers[0]): 256}] * 2
    finally:
        r.stop()
    cp = ControlPlaneManager("least_load")
    cp.register_url(urls[0])
    cp.register_url(f"http://127.0.0.1:{find_free_port()}@other")
    model = model_of(two_workers[0])
    assert cp.workers[0].models == {model: 256} and cp.workers[0].healthy
    assert cp.workers[1].models == {"other": None} and not cp.workers[1].healthy
    assert cp.route(model, messages=[{"role": "user", "content": "x"}]).url == urls[0]
    with pytest.raises(NoHealthyWorkerError):
        cp.route("other")


def test_sagellm_router_command(two_workers: list[ServerThread], capsys: Any) -> None:
    import signal
    import subprocess
    import sys

    from sagellm.engine.cli import main

    with pytest.raises(SystemExit):
        main(["router", "--help"])
    assert "usage: sagellm router" in capsys.readouterr().out
    port = find_free_port()
    urls = [w.url for w in two_workers]
    cmd = [sys.executable, "-m", "sagellm.engine.cli", "router", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--policy", "cache_aware", "--worker-urls", *urls],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=60, what="sagellm router to answer")
        model = model_of(two_workers[0])
        got = client(url).completions.create(model=model, prompt="hello there", **GREEDY)
        want = client(urls[0]).completions.create(model=model, prompt="hello there", **GREEDY)
        assert got.choices[0].text == want.choices[0].text
        assert 'decision="cache_miss"' in httpx.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130, -signal.SIGINT)
    assert port_is_free(port)
