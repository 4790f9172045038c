"""Cross-tenant probe: one tenant's cached prompt is never a hit for another tenant or salt.

Tenant A sends a prompt holding a secret (twelve full KV blocks); tenant B sends the same
prompt, with A's salt and with none, and A itself sends it without its salt and with
another: every probe gets 0 cached tokens and adds no prefix hit. A re-sending it with its
salt does hit, so the probes would see a hit if isolation were broken. Runs with both
prefix indexes, on the device pool and with the KV tiers (where A's blocks are pushed
down to the host tier before the probes, so a leak would show as a promotion).
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from sagellm.engine.async_engine import AsyncLLMEngine
from sagellm.engine.config import APIKey, ServerConfig
from sagellm.engine.server import ServerThread, build_app

from .conftest import make_llm

# Needs sagellm-prefix-cache beside the engine: runs in `nox -s integration`.
pytestmark = pytest.mark.integration
pytest.importorskip("sagellm.prefix_cache")

KEY_A, KEY_B = "sk-tenant-a-0123456789", "sk-tenant-b-9876543210"
BLOCK_SIZE = 4  # conftest.TINY_OPTIONS
SECRET = [5 + (37 * i) % 250 for i in range(48)]  # 12 full blocks
FILLER = [7 + (11 * i) % 240 for i in range(56)]  # another prompt, pushes A's blocks down
# A hit covers the full blocks of the prompt minus its last token (computed for logits).
FULL_HIT = (len(SECRET) - 1) // BLOCK_SIZE * BLOCK_SIZE

TIERED = {"name": "tiered", "options": {"host": {"num_blocks": 256}, "disk": None}}
CASES = {
    "radix": {"prefix_cache": "radix", "num_blocks": 128},
    "block_hash": {"prefix_cache": "block_hash", "num_blocks": 128},
    # 16 device blocks (64 tokens: the longest prompt fits, two prompts do not)
    "radix+tiers": {"prefix_cache": "radix", "kv_pool": TIERED, "num_blocks": 16},
    "block_hash+tiers": {"prefix_cache": "block_hash", "kv_pool": TIERED, "num_blocks": 16},
}


def _ask(srv: Any, key: str, model: str, prompt: list[int], salt: str | None) -> int:
    """Cached prompt tokens reported for one request."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)
    extra: dict[str, Any] = {"ignore_eos": True}
    if salt is not None:
        extra["cache_salt"] = salt
    resp = client.completions.create(
        model=model, prompt=prompt, max_tokens=1, temperature=0.0, extra_body=extra
    )
    assert resp.usage is not None and resp.usage.prompt_tokens == len(prompt)
    details = resp.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    return details.cached_tokens


@pytest.mark.parametrize("case", list(CASES))
def test_a_tenants_prompt_is_no_hit_for_another_tenant_or_salt(tiny_model, case) -> None:
    options = CASES[case]
    llm = make_llm(
        tiny_model, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=256, **options
    )
    index = llm.engine.parts.prefix_index
    tiered = "kv_pool" in options
    keys = [APIKey(key=KEY_A, tenant="tenant-a"), APIKey(key=KEY_B, tenant="tenant-b")]
    config = ServerConfig(port=0, api_keys=keys)
    model = llm.engine.model_name
    with ServerThread(build_app(AsyncLLMEngine(llm.engine), config), config) as srv:
        assert _ask(srv, KEY_A, model, SECRET, "tenant-a") == 0  # cold
        if tiered:
            # B's unrelated prompt needs the device blocks A's prefix holds: they go down
            # to the host tier, where a probe that leaked would promote them.
            assert _ask(srv, KEY_B, model, FILLER, None) == 0
            # 14 blocks for it, 4 free: 10 of A's 12 go down
            assert index.make_stats().num_demoted_blocks == 10
        index.make_stats()  # reset the counters
        probes = [
            (KEY_B, "tenant-a"),  # another tenant, even with A's salt
            (KEY_B, None),  # another tenant, no salt
            (KEY_B, "tenant-b"),
            (KEY_A, None),  # A itself, without its salt
            (KEY_A, "another-salt"),
        ]
        for key, salt in probes:
            assert _ask(srv, key, model, SECRET, salt) == 0, (key[:11], salt)
            stats = index.make_stats()
            assert stats.num_hits == 0 and stats.num_matched_tokens == 0, (key[:11], salt)
            if tiered:
                assert stats.num_promoted_blocks == 0 and stats.num_promoted_tokens == 0
        # A's own prefix is still there: the same tenant and salt hit all of it.
        assert _ask(srv, KEY_A, model, SECRET, "tenant-a") == FULL_HIT
        stats = index.make_stats()
        assert stats.num_hits == 1 and stats.num_matched_tokens == FULL_HIT
        if tiered:
            assert stats.num_promoted_blocks > 0
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    pool = engine.kv_pool
    assert pool.num_free_blocks + index.num_cached_blocks == pool.num_blocks
    pool.free(index.clear())
    assert pool.num_free_blocks == pool.num_blocks


def test_without_keys_the_salt_alone_isolates(tiny_model) -> None:
    llm = make_llm(tiny_model, num_blocks=128, prefix_cache="radix")
    index = llm.engine.parts.prefix_index
    config = ServerConfig(port=0)
    model = llm.engine.model_name
    with ServerThread(build_app(AsyncLLMEngine(llm.engine), config), config) as srv:
        assert _ask(srv, "none", model, SECRET, "salt-1") == 0
        index.make_stats()
        for salt in (None, "salt-2"):
            assert _ask(srv, "none", model, SECRET, salt) == 0
            assert index.make_stats().num_hits == 0
        assert _ask(srv, "none", model, SECRET, "salt-1") == FULL_HIT
        # The unsalted request above cached the prompt under no salt: that one hits too.
        assert _ask(srv, "none", model, SECRET, None) == FULL_HIT
    pool = llm.engine.kv_pool
    pool.free(index.clear())
    assert pool.num_free_blocks == pool.num_blocks


def test_offline_llm_takes_tenant_and_salt(tiny_model) -> None:
    from sagellm.core.types import SamplingParams

    llm = make_llm(tiny_model, num_blocks=128, prefix_cache="radix")
    greedy = SamplingParams(temperature=0, max_tokens=1)

    def cached(**kwargs: Any) -> int:
        (out,) = llm.generate([SECRET], greedy, **kwargs)
        return out.metrics.num_cached_tokens

    assert cached(tenant="a", cache_salt="s") == 0
    assert cached(tenant="b", cache_salt="s") == 0
    assert cached(tenant="a") == 0
    assert cached() == 0
    assert cached(tenant="a", cache_salt="s") == FULL_HIT
    (chat,) = llm.chat([{"role": "user", "content": "hi"}], greedy, tenant="a")
    (again,) = llm.chat([{"role": "user", "content": "hi"}], greedy, tenant="b")
    assert again.metrics.num_cached_tokens == 0
    (same,) = llm.chat([{"role": "user", "content": "hi"}], greedy, tenant="a")
    expected = (len(chat.prompt_token_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert expected > 0 and same.metrics.num_cached_tokens == expected
