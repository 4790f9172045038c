"""Prefill/decode disaggregation: a kv_producer and a kv_consumer over the torch channel.

Both instances run in this process (each channel's gloo pair is two threads); float32, so
the decode instance's greedy tokens must equal one instance's, token for token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sagellm.core.errors import ConfigError, InvalidRequestError
from sagellm.core.types import SamplingParams
from sagellm.engine.async_engine import AsyncLLMEngine
from sagellm.engine.config import ServerConfig
from sagellm.engine.disagg import KVTransferSettings, prompt_digest
from sagellm.engine.llm import LLM
from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.router import HTTPRouter, RouterConfig, RouterThread
from sagellm.engine.server import ServerThread, build_app

from .conftest import make_llm

pytest.importorskip("sagellm.kv_transfer")
pytestmark = pytest.mark.integration  # needs sagellm-kv-transfer

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
PREFILL = SamplingParams(max_tokens=1, temperature=0.0)
OFFER = {"do_remote_decode": True}


def pd_pair(
    model: Path, producer: dict[str, Any] | None = None, consumer: dict[str, Any] | None = None
) -> tuple[LLM, LLM]:
    """A kv_producer on a free port and the kv_consumer paired with it."""
    prod = make_llm(
        model,
        num_blocks=64,
        kv_transfer_config={
            "kv_role": "kv_producer",
            "kv_port": 0,
            "kv_connector_extra_config": {"timeout_s": 5.0, **(producer or {})},
        },
    )
    port = int(prod.engine.kv_transfer.address.rpartition(":")[2])
    cons = make_llm(
        model,
        num_blocks=64,
        kv_transfer_config={
            "kv_role": "kv_consumer",
            "kv_port": port,
            "kv_connector_extra_config": {"timeout_s": 5.0, **(consumer or {})},
        },
    )
    return prod, cons


@pytest.fixture(scope="module")
def pair(tiny_model: Path) -> Iterator[tuple[LLM, LLM]]:
    prod, cons = pd_pair(tiny_model)
    try:
        yield prod, cons
    finally:
        cons.engine.close()
        prod.engine.close()


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> LLM:
    return make_llm(tiny_model, num_blocks=64)


def run(engine: LLMEngine, rid: str, prompt: list[int], sampling: SamplingParams, **kw: Any) -> Any:
    engine.add_request(rid, prompt, sampling, **kw)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    assert final is not None
    return final


def used(llm: LLM) -> int:
    pool = llm.engine.kv_pool
    return int(pool.num_blocks - pool.num_free_blocks)


def settle(prod: LLM, timeout: float = 5.0) -> None:
    """Step the producer until its channel has released every offer."""
    deadline = time.monotonic() + timeout
    while used(prod) and time.monotonic() < deadline:
        prod.engine.step()
        time.sleep(0.01)


# ---------------------------------------------------------------------- engines


@pytest.mark.parametrize("length", [1 + 2 * 4, 3 * 4, 37])  # block size 4: ends 1, 0, 1 past
def test_decode_instance_matches_one_instance(
    pair: tuple[LLM, LLM], reference: LLM, length: int
) -> None:
    prod, cons = pair
    prompt = [(7 * i + 3) % 200 + 5 for i in range(length)]
    want = run(reference.engine, f"ref-{length}", prompt, GREEDY).outputs[0].token_ids

    first = run(prod.engine, f"p-{length}", prompt, PREFILL, kv_transfer_params=OFFER)
    params = first.kv_transfer_params
    assert first.outputs[0].token_ids == want[:1]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["num_tokens"] == length
    assert params["remote_request_id"] == f"p-{length}"
    assert len(params["remote_block_ids"]) == -(-length // 4)
    assert params["prompt_sha256"] == prompt_digest(prompt)
    assert used(prod) == len(params["remote_block_ids"])  # kept for the consumer

    before = cons.engine._stats.num_scheduled_tokens
    out = run(cons.engine, f"c-{length}", prompt, GREEDY, kv_transfer_params=params)
    assert out.outputs[0].token_ids == want
    # only the last prompt token is computed here, then one token per decode step
    assert out.metrics.num_cached_tokens == length - 1
    assert cons.engine._stats.num_scheduled_tokens - before == GREEDY.max_tokens
    assert used(cons) == 0
    settle(prod)
    assert used(prod) == 0  # acknowledged: the producer freed its blocks


def test_stats_count_offers_and_loads(tiny_model: Path) -> None:
    prod, cons = pd_pair(tiny_model)
    try:
        prompt = list(range(10, 30))
        params = run(prod.engine, "p", prompt, PREFILL, kv_transfer_params=OFFER).kv_transfer_params
        run(cons.engine, "c", prompt, GREEDY, kv_transfer_params=params)
        p_stats = prod.engine.component_stats()
        c_stats = cons.engine.component_stats()
        assert (p_stats["kv_transfer"].num_offers, p_stats["kv_transfer"].num_offered_tokens) == (
            1,
            20,
        )
        kv = c_stats["kv_transfer"]
        assert (kv.num_loads, kv.num_loaded_tokens, kv.num_load_failures) == (1, 19, 0)
        assert kv.load_seconds > 0
        assert c_stats["kv_channel"].bytes_received == params["total_bytes"]
        assert c_stats["scheduler"].num_external_tokens == 19
    finally:
        cons.engine.close()
        prod.engine.close()


def test_failed_load_computes_the_prompt_here(tiny_model: Path, reference: LLM) -> None:
    """An offer whose lease ran out, then a producer that is gone: the decode instance
    computes the prompt itself, with the same tokens, and leaks no block."""
    prod, cons = pd_pair(tiny_model, producer={"lease_s": 0.3})
    try:
        prompt = list(range(40, 61))
        want = run(reference.engine, "ref", prompt, GREEDY).outputs[0].token_ids
        stale = run(prod.engine, "p1", prompt, PREFILL, kv_transfer_params=OFFER)
        time.sleep(0.4)
        prod.engine.step()  # the lease expires: the producer frees the blocks
        assert used(prod) == 0
        out = run(cons.engine, "c1", prompt, GREEDY, kv_transfer_params=stale.kv_transfer_params)
        assert out.outputs[0].token_ids == want
        assert out.metrics.num_cached_tokens == 0

        live = run(prod.engine, "p2", prompt, PREFILL, kv_transfer_params=OFFER)
        prod.engine.close()  # the producer goes away before the decode loads
        out = run(cons.engine, "c2", prompt, GREEDY, kv_transfer_params=live.kv_transfer_params)
        assert out.outputs[0].token_ids == want
        assert cons.engine.component_stats()["kv_transfer"].num_load_failures == 2
        assert used(cons) == 0
        assert used(prod) == 0  # closing freed what it still offered
    finally:
        cons.engine.close()
        prod.engine.close()


def test_abort_while_loading_frees_the_blocks(pair: tuple[LLM, LLM]) -> None:
    prod, cons = pair
    prompt = list(range(60, 90))
    params = run(prod.engine, "p-abort", prompt, PREFILL, kv_transfer_params=OFFER)
    cons.engine.add_request("c-abort", prompt, GREEDY, kv_transfer_params=params.kv_transfer_params)
    assert cons.engine.kv_transfer.num_loading == 1
    assert used(cons) == len(params.kv_transfer_params["remote_block_ids"])
    cons.engine.abort_request("c-abort")
    assert not cons.engine.has_unfinished_requests()
    deadline = time.monotonic() + 5
    while used(cons) and time.monotonic() < deadline:
        cons.engine.step()
        time.sleep(0.01)
    assert used(cons) == 0
    settle(prod)
    assert used(prod) == 0


def test_a_consumer_that_never_loads_leaks_nothing(tiny_model: Path) -> None:
    prod, cons = pd_pair(tiny_model, producer={"lease_s": 0.3})
    try:
        run(prod.engine, "p", list(range(5, 25)), PREFILL, kv_transfer_params=OFFER)
        assert used(prod) == 5
        time.sleep(0.4)
        prod.engine.step()
        assert used(prod) == 0
        assert prod.engine.component_stats()["kv_channel"].num_expired == 1
    finally:
        cons.engine.close()
        prod.engine.close()


def test_requests_the_pair_cannot_serve_are_refused(pair: tuple[LLM, LLM], reference: LLM) -> None:
    prod, cons = pair
    prompt = list(range(100, 120))
    # a standalone instance serves such a request as any other (vLLM does the same)
    out = run(reference.engine, "plain", prompt, GREEDY, kv_transfer_params=OFFER)
    assert out.kv_transfer_params is None and len(out.outputs[0].token_ids) == 10
    with pytest.raises(InvalidRequestError, match="it is a kv_consumer"):
        cons.engine.add_request("x", prompt, GREEDY, kv_transfer_params=OFFER)
    with pytest.raises(InvalidRequestError, match="one completion"):
        prod.engine.add_request(
            "x", prompt, SamplingParams(max_tokens=1, n=2), kv_transfer_params=OFFER
        )
    params = run(prod.engine, "p-refuse", prompt, PREFILL, kv_transfer_params=OFFER)
    offer = params.kv_transfer_params
    with pytest.raises(InvalidRequestError, match="this instance is a kv_producer"):
        prod.engine.add_request("x", prompt, GREEDY, kv_transfer_params=offer)
    with pytest.raises(InvalidRequestError, match="computed for another prompt"):
        cons.engine.add_request("x", prompt[:-1] + [7], GREEDY, kv_transfer_params=offer)
    with pytest.raises(InvalidRequestError, match="paired with"):
        cons.engine.add_request("x", prompt, GREEDY, kv_transfer_params={**offer, "remote_port": 1})
    with pytest.raises(InvalidRequestError, match="lacks or misstates 'remote_block_ids'"):
        bad = {k: v for k, v in offer.items() if k != "remote_block_ids"}
        cons.engine.add_request("x", prompt, GREEDY, kv_transfer_params=bad)
    assert not cons.engine.has_unfinished_requests()
    run(cons.engine, "c-refuse", prompt, GREEDY, kv_transfer_params=offer)  # still valid
    settle(prod)
    assert used(prod) == 0 and used(cons) == 0


def test_settings_spelling() -> None:
    s = KVTransferSettings.parse(
        '{"kv_connector": "P2pNcclConnector", "kv_role": "kv_consumer", "kv_ip": "10.0.0.2", '
        '"kv_port": 29600, "kv_connector_extra_config": {"chunk_blocks": 16}}'
    )
    assert s.channel_name == "torch"
    assert s.channel_options() == {
        "chunk_blocks": 16,
        "role": "consumer",
        "address": "10.0.0.2:29600",
    }
    plain = KVTransferSettings.parse({"kv_role": "kv_producer", "kv_port": 7})
    assert plain.channel_options() == {
        "chunk_blocks": 64,
        "role": "producer",
        "address": "127.0.0.1:7",
    }
    nixl = KVTransferSettings.parse({"kv_connector": "NixlConnector", "kv_role": "kv_producer"})
    assert (nixl.channel_name, "chunk_blocks" in nixl.channel_options()) == ("nixl", False)
    with pytest.raises(ConfigError, match="'kv_both' is not supported"):
        KVTransferSettings.parse({"kv_role": "kv_both"})
    with pytest.raises(ConfigError, match="needs the producer's kv_ip and kv_port"):
        KVTransferSettings.parse({"kv_role": "kv_consumer"})
    with pytest.raises(ConfigError, match="not valid JSON"):
        KVTransferSettings.parse("{kv_role")
    with pytest.raises(ConfigError, match="bad kv_transfer_config"):
        KVTransferSettings.parse({"kv_role": "kv_producer", "kv_rank": 0})


# ---------------------------------------------------------------------- servers and router


def _serve(llm: LLM) -> ServerThread:
    config = ServerConfig(port=0, log_level="critical")
    return ServerThread(build_app(AsyncLLMEngine(llm.engine), config), config).start()


@pytest.fixture(scope="module")
def pd_servers(
    tiny_model: Path, reference: LLM
) -> Iterator[tuple[RouterThread, ServerThread, ServerThread, ServerThread]]:
    prod, cons = pd_pair(tiny_model)
    servers = [_serve(prod), _serve(cons), _serve(reference)]
    router = HTTPRouter(
        [], RouterConfig(health_interval=0), pd_pairs=[(servers[0].url, servers[1].url)]
    )
    rt = RouterThread(router).start()
    try:
        yield rt, servers[0], servers[1], servers[2]
    finally:
        rt.stop()
        for s in servers:
            s.stop()


def _complete(url: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def test_router_runs_prefill_then_decode(
    pd_servers: tuple[RouterThread, ServerThread, ServerThread, ServerThread],
) -> None:
    router, prod, cons, single = pd_servers
    model = httpx.get(single.url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "the cat sat on the mat and", "max_tokens": 8}
    body["temperature"] = 0.0
    want = _complete(single.url, body)["choices"][0]["text"]
    got = _complete(router.url, body)
    assert got["choices"][0]["text"] == want
    assert "kv_transfer_params" not in got  # the decode leg offers nothing
    stats = httpx.get(cons.url + "/metrics").text
    assert "sagellm_kv_transfer_num_loads_total" in stats

    # streamed through the router: the decode leg streams
    with httpx.stream(
        "POST", router.url + "/v1/completions", json={**body, "stream": True}, timeout=60
    ) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == want

    # chat: the prefill leg caps max_completion_tokens too
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_completion_tokens": 6,
        "temperature": 0.0,
    }
    want_chat = httpx.post(single.url + "/v1/chat/completions", json=chat, timeout=60).json()
    got_chat = httpx.post(router.url + "/v1/chat/completions", json=chat, timeout=60).json()
    assert got_chat["choices"][0]["message"] == want_chat["choices"][0]["message"]


def test_producer_answers_with_its_offer(
    pd_servers: tuple[RouterThread, ServerThread, ServerThread, ServerThread],
) -> None:
    _, prod, _, single = pd_servers
    model = httpx.get(prod.url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "one two three four five", "max_tokens": 1}
    out = _complete(prod.url, {**body, "kv_transfer_params": OFFER})
    params = out["kv_transfer_params"]
    assert params["do_remote_prefill"] is True
    assert params["remote_port"] == int(
        prod.app.state.server.engine.engine.kv_transfer.address.rpartition(":")[2]
    )
    out = _complete(single.url, {**body, "kv_transfer_params": OFFER})
    assert "kv_transfer_params" not in out  # ignored by an instance without a channel
    resp = httpx.post(
        prod.url + "/v1/completions",
        json={**body, "prompt": ["a b", "c d"], "kv_transfer_params": OFFER},
    )
    assert resp.status_code == 400
    assert "one prompt" in resp.json()["error"]["message"]


def test_router_reports_a_prefill_worker_without_kv_transfer(
    tiny_model: Path, reference: LLM
) -> None:
    plain = [_serve(reference), _serve(make_llm(tiny_model, num_blocks=64))]
    router = HTTPRouter(
        [], RouterConfig(health_interval=0), pd_pairs=[(plain[0].url, plain[1].url)]
    )
    rt = RouterThread(router).start()
    try:
        model = httpx.get(plain[0].url + "/v1/models").json()["data"][0]["id"]
        resp = httpx.post(
            rt.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}
        )
        assert resp.status_code == 502  # the prefill worker offered no KV
        assert resp.json()["error"]["message"] == (
            f"the prefill worker {plain[0].url} returned no kv_transfer_params; start it "
            'with --kv-transfer-config \'{"kv_role": "kv_producer", ...}\''
        )
    finally:
        rt.stop()
        for s in plain:
            s.stop()


def test_router_takes_a_dead_decode_worker_out(tiny_model: Path) -> None:
    prod, cons = pd_pair(tiny_model, producer={"lease_s": 0.5})
    p_srv, c_srv = _serve(prod), _serve(cons)
    router = HTTPRouter(
        [],
        RouterConfig(health_interval=0, health_failures=1),
        pd_pairs=[(p_srv.url, c_srv.url)],
    )
    rt = RouterThread(router).start()
    try:
        model = httpx.get(p_srv.url + "/v1/models").json()["data"][0]["id"]
        c_srv.stop()  # the decode instance dies
        body = {"model": model, "prompt": "a b c d e f g", "max_tokens": 4}
        resp = httpx.post(rt.url + "/v1/completions", json=body, timeout=30)
        assert resp.status_code == 503
        assert not router.pool.workers[0].decode.healthy
        resp = httpx.post(rt.url + "/v1/completions", json=body, timeout=30)
        assert resp.status_code == 503
        assert "no healthy worker" in resp.json()["error"]["message"]
        # the prefill leg's offer is freed once its lease runs out
        deadline = time.monotonic() + 5
        while used(prod) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert used(prod) == 0
    finally:
        rt.stop()
        p_srv.stop()
        cons.engine.close()


def test_a_decode_instance_killed_mid_transfer(tiny_model: Path, tmp_path: Path) -> None:
    """The decode instance is a process, killed while it loads the prompt's KV: the
    request fails with the router's message, the router takes the pair's decode out, and
    the producer frees every block and keeps serving."""
    import os
    import signal
    import sys
    import threading

    from sagellm.core.ports import find_free_port
    from sagellm.engine.bench.serve_peers import ServerProcess

    prod = make_llm(
        tiny_model,
        num_blocks=64,
        kv_transfer_config={
            "kv_role": "kv_producer",
            "kv_port": 0,
            "kv_connector_extra_config": {"timeout_s": 5.0, "lease_s": 1.0},
        },
    )
    kv_port = int(prod.engine.kv_transfer.address.rpartition(":")[2])
    channel = prod.engine.kv_transfer.channel
    serving = threading.Event()
    real_serve = channel._serve

    def slow_serve(*args: Any) -> Any:  # the load is under way when the consumer dies
        serving.set()
        time.sleep(1.0)
        return real_serve(*args)

    channel._serve = slow_serve
    p_srv = _serve(prod)
    port = find_free_port()
    consumer = {"kv_role": "kv_consumer", "kv_port": kv_port}
    consumer["kv_connector_extra_config"] = {"timeout_s": 5.0}
    cmd = [sys.executable, "-m", "sagellm.engine.cli", "serve", "--model", str(tiny_model)]
    cmd += ["--port", str(port), "--dtype", "float32", "--block-size", "4"]
    cmd += ["--max-model-len", "256", "--num-blocks", "64", "--seed", "0"]
    cmd += ["--kv-transfer-config", json.dumps(consumer)]
    cons = ServerProcess("consumer", cmd, port, log_path=tmp_path / "consumer.log", timeout=180)
    c_url = f"http://127.0.0.1:{port}"
    router = HTTPRouter(
        [], RouterConfig(health_interval=0, health_failures=1), pd_pairs=[(p_srv.url, c_url)]
    )
    rt = RouterThread(router).start()
    try:
        model = httpx.get(p_srv.url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "a b c d e f g h i j", "max_tokens": 4}
        answer: dict[str, httpx.Response] = {}

        def call() -> None:
            answer["resp"] = httpx.post(rt.url + "/v1/completions", json=body, timeout=60)

        caller = threading.Thread(target=call)
        caller.start()
        assert serving.wait(60), "the decode leg never started its load"
        os.killpg(cons.proc.pid, signal.SIGKILL)
        caller.join(60)
        resp = answer["resp"]
        assert resp.status_code == 503, resp.text
        assert "failed" in resp.json()["error"]["message"]
        assert not router.pool.workers[0].decode.healthy
        again = httpx.post(rt.url + "/v1/completions", json=body, timeout=30)
        assert again.status_code == 503  # the pair cannot serve without its decode
        deadline = time.monotonic() + 10
        while used(prod) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert used(prod) == 0  # the survivor frees the offer's blocks
        plain = _complete(p_srv.url, {"model": model, "prompt": "a b c", "max_tokens": 3})
        assert plain["usage"]["completion_tokens"] == 3  # and keeps serving
    finally:
        rt.stop()
        p_srv.stop()
        cons.stop()
        prod.engine.close()
