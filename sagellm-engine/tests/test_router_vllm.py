"""The router in front of a real `vllm serve` (vLLM's CPU wheel) next to a sageLLM server.

Runs where the vLLM peer environment exists (``nox -s peers -- vllm`` makes
``.nox/peers-vllm``); skipped elsewhere. Both servers serve the embedded model under one
name; vLLM reads the Hugging Face folder the benchmark exports from the GGUF file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sagellm.core.ports import find_free_port
from sagellm.engine.router import HTTPRouter, RouterConfig, RouterThread

pytestmark = pytest.mark.integration

NAME = "smollm2"
GREEDY: dict[str, Any] = {"max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from sagellm.engine.bench.peers import find_peer_python, vllm_env
    from sagellm.engine.bench.serve_peers import (
        ServerProcess,
        sagellm_serve_command,
        vllm_serve_command,
    )

    try:
        python = find_peer_python("peers-vllm")
    except FileNotFoundError as exc:
        pytest.skip(f"no vLLM peer environment ({exc}); make it with `nox -s peers -- vllm`")
    from sagellm.engine.bench.hf_export import export_hf_folder
    from sagellm.engine.models.source import resolve_model

    logs = tmp_path_factory.mktemp("router-vllm")
    folder = export_hf_folder(resolve_model("smollm2-135m"))
    vp, sp = find_free_port(), find_free_port()
    vllm = ServerProcess(
        "vllm serve",
        vllm_serve_command(python, vp, NAME, folder),
        vp,
        env=vllm_env(1),
        log_path=Path(logs) / "vllm.log",
        timeout=900,
    )
    try:
        sage = ServerProcess(
            "sagellm serve",
            sagellm_serve_command(sp, NAME, ["--threads", "1"]),
            sp,
            log_path=Path(logs) / "sagellm.log",
        )
    except BaseException:
        vllm.stop()
        raise
    try:
        yield {"vllm": vllm, "sagellm": sage}
    finally:
        sage.stop()
        vllm.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _routed(r: RouterThread, worker: str) -> int:
    total = 0
    for line in httpx.get(r.url + "/metrics").text.splitlines():
        if line.startswith("sagellm_router_requests_total") and f'worker="{worker}"' in line:
            total += int(float(line.split()[-1]))
    return total


def test_router_mixes_vllm_and_sagellm_workers(servers: dict[str, Any]) -> None:
    vllm_url = f"http://127.0.0.1:{servers['vllm'].port}"
    sage_url = f"http://127.0.0.1:{servers['sagellm'].port}"
    r = RouterThread(
        HTTPRouter(
            [vllm_url, sage_url],
            RouterConfig(policy="round_robin", health_interval=0.5, health_failures=1),
        )
    ).start()
    try:
        # capabilities read from each worker's /v1/models: vLLM's card gives its context
        assert r.router.pool.get(vllm_url).models == {NAME: 8192}
        assert NAME in r.router.pool.get(sage_url).models
        via = _client(r.url)
        assert [m.id for m in via.models.list().data] == [NAME]
        prompt = "The capital of France is"
        direct = {
            url: _client(url)
            .completions.create(model=NAME, prompt=prompt, **GREEDY)
            .choices[0]
            .text
            for url in (vllm_url, sage_url)
        }
        assert all(direct.values())
        texts = [
            via.completions.create(model=NAME, prompt=prompt, **GREEDY).choices[0].text
            for _ in range(4)
        ]
        # round robin: every answer is one worker's own, unchanged, two from each
        assert sorted(texts) == sorted(list(direct.values()) * 2)
        assert _routed(r, vllm_url) == 2 and _routed(r, sage_url) == 2
        chat = [{"role": "user", "content": "Name a colour."}]
        for _ in range(2):  # one streamed chat through each worker
            stream = via.chat.completions.create(model=NAME, messages=chat, stream=True, **GREEDY)
            pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            assert "".join(pieces)
        assert _routed(r, vllm_url) == 3 and _routed(r, sage_url) == 3
        # vLLM goes away: its requests are retried on sageLLM, and it is taken out
        servers["vllm"].stop()
        for _ in range(3):
            got = via.completions.create(model=NAME, prompt=prompt, **GREEDY).choices[0].text
            assert got == direct[sage_url]
        assert not r.router.pool.get(vllm_url).healthy
    finally:
        r.stop()
