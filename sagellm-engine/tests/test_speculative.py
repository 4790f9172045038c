"""Speculative decoding in the engine: greedy outputs unchanged, KV rolled back, stats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm.core.errors import ConfigError
from sagellm.core.types import SamplingParams

from .conftest import assert_no_leak, make_llm

pytest.importorskip("sagellm.speculative")

# prompts that repeat themselves, so lookup drafts are often right, and one that does not
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7],
    [20, 21, 22, 23, 20, 21, 22, 23, 20, 21],
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6],
    [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 40, 41, 42],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# drafting never switched off (the defaults pause it at 8 running requests or low acceptance)
ALWAYS = {"disable_by_batch_size": 1000, "min_acceptance_rate": 0.0}


def _drain_index(llm) -> None:
    """Evict every cached prefix so that only leaked blocks stay in use."""
    index = llm.engine.parts.prefix_index
    pool = llm.engine.kv_pool
    while index is not None:
        released = index.evict(pool.num_blocks)
        if not released:
            break
        pool.free(released)


def _run(model: Path, spec: dict | None, sampling=GREEDY, repeat: int = 1, **options):
    llm = make_llm(model, speculative_config=spec, **options)
    for _ in range(repeat):  # a repeat hits the prefix cache the first run filled
        outs = llm.generate(PROMPTS, sampling)
    _drain_index(llm)
    assert_no_leak(llm)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def baseline(tiny_model: Path) -> list[list[int]]:
    return _run(tiny_model, None, num_blocks=256)[1]


# model-based proposers: the target itself as its draft model, and the target without
# its second layer (the tiny model has two)
METHODS = {
    "ngram": {},
    "suffix": {},
    "draft": {"num_blocks": 128},
    "layer_skip": {"skip_layers": [1], "num_blocks": 128},
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("prefix", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_greedy_outputs_unchanged(tiny_model: Path, baseline, method: str, prefix: bool) -> None:
    opts = {"num_blocks": 256}
    if prefix:
        opts["prefix_cache"] = "radix"
    spec = {"method": method, "num_speculative_tokens": 4, **METHODS[method], **ALWAYS}
    llm, got = _run(tiny_model, spec, repeat=2, **opts)
    assert got == baseline
    stats = llm.engine.speculative.total
    assert stats.num_draft_tokens > 0
    assert stats.num_emitted_tokens == stats.num_drafts + stats.num_accepted_tokens


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_unchanged_under_preemption_and_small_budget(
    tiny_model: Path, baseline, method: str
) -> None:
    llm, got = _run(
        tiny_model,
        {"method": method, "num_speculative_tokens": 5, **METHODS[method], **ALWAYS},
        num_blocks=14,
        max_model_len=48,
        max_num_batched_tokens=8,
    )
    assert got == baseline
    assert llm.engine.make_stats().num_preemptions > 0


def test_sampled_run_with_logprobs_and_n(tiny_model: Path) -> None:
    sp = SamplingParams(temperature=0.8, max_tokens=12, seed=3, logprobs=2, n=2, ignore_eos=True)
    llm = make_llm(tiny_model, num_blocks=256, speculative_config={"method": "ngram", **ALWAYS})
    outs = llm.generate(PROMPTS[:2], sp)
    for o in outs:
        assert len(o.outputs) == 2
        for c in o.outputs:
            assert len(c.token_ids) == 12
            assert len(c.logprobs) == 12
            for tok, entry in zip(c.token_ids, c.logprobs):
                assert tok in entry and entry[tok] <= 0.0
    assert_no_leak(llm)


def test_disable_by_batch_size(tiny_model: Path, baseline) -> None:
    llm, got = _run(
        tiny_model,
        {"method": "ngram", "disable_by_batch_size": 2, "min_acceptance_rate": 0.0},
        num_blocks=256,
    )
    assert got == baseline
    assert llm.engine.speculative.total.num_disabled_steps > 0


def test_low_acceptance_switches_off(tiny_model: Path, baseline) -> None:
    spec = {
        "method": "ngram",
        "min_acceptance_rate": 1.0,
        "acceptance_window": 4,
        "disabled_steps": 1000,
    }
    llm, got = _run(tiny_model, spec, num_blocks=256)
    assert got == baseline
    total = llm.engine.speculative.total
    assert total.num_disabled_steps > 0


def test_bad_config_says_what_to_do(tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match="needs a 'method'"):
        make_llm(tiny_model, speculative_config={"num_speculative_tokens": 3})
    with pytest.raises(ConfigError, match="not valid JSON"):
        make_llm(tiny_model, speculative_config="{method: ngram")


def test_stop_strings_and_stats_are_published(tiny_model: Path) -> None:
    plain = make_llm(tiny_model, num_blocks=256)
    first = plain.generate(PROMPTS[:1], GREEDY)[0].outputs[0]
    assert len(first.text) > 6
    stop = first.text[3:6]  # a stop string that the greedy text reaches early
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    want = plain.generate(PROMPTS, sp)
    spec = make_llm(tiny_model, num_blocks=256, speculative_config={"method": "ngram", **ALWAYS})
    got = spec.generate(PROMPTS, sp)
    assert [
        (o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in got
    ] == [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in want]
    assert_no_leak(spec)
    stats = spec.engine.component_stats()["speculative"]
    assert stats.num_draft_tokens > 0
    assert stats.acceptance_rate == stats.num_accepted_tokens / stats.num_draft_tokens
    assert stats.mean_accepted_length == stats.num_emitted_tokens / stats.num_drafts
    assert spec.engine.component_stats()["speculative"].num_draft_tokens == 0  # reset


def test_draft_tokens_count_against_the_step_budget(tiny_model: Path) -> None:
    llm = make_llm(
        tiny_model,
        num_blocks=256,
        max_num_batched_tokens=3,
        speculative_config={"method": "ngram", "num_speculative_tokens": 8, **ALWAYS},
    )
    seen = []
    real = llm.engine.runtime.execute

    def spy(plan):
        seen.append(sum(len(c.token_ids) for c in plan.compute_chunks))
        return real(plan)

    llm.engine.runtime.execute = spy
    llm.generate(PROMPTS[:2], GREEDY)
    assert max(seen) <= 3
    assert llm.engine.speculative.total.num_draft_tokens > 0


def _chi2_two_sample(a: list[tuple], b: list[tuple]) -> tuple[float, float]:
    """Two-sample chi-square statistic over the outcomes (cells seen fewer than 10 times in
    both samples together are pooled) and its critical value at p = 0.001."""
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    cells = set(ca) | set(cb)
    rare = [c for c in cells if ca[c] + cb[c] < 10]
    stat, k = 0.0, 0
    groups = [[c] for c in cells if c not in rare] + ([rare] if rare else [])
    for g in groups:
        x, y = sum(ca[c] for c in g), sum(cb[c] for c in g)
        stat += (x - y) ** 2 / (x + y)
        k += 1
    df = k - 1
    z = 3.090  # one-sided normal quantile of 0.001 (Wilson-Hilferty approximation)
    crit = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    return stat, crit


def _samples(llm, n: int) -> list[tuple]:
    prompt = list(range(320))  # every token occurs: a 1-gram lookup always proposes
    sps = [
        SamplingParams(temperature=1.0, top_k=3, max_tokens=3, seed=1000 + i, ignore_eos=True)
        for i in range(n)
    ]
    outs = llm.generate([prompt] * n, sps)
    return [tuple(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def plain_samples(tiny_model: Path) -> list[tuple]:
    return _samples(
        make_llm(tiny_model, num_blocks=512, max_model_len=512, prefix_cache="radix"), 600
    )


def test_sampled_outputs_keep_the_target_distribution(tiny_model: Path, plain_samples) -> None:
    spec = make_llm(
        tiny_model,
        num_blocks=512,
        max_model_len=512,
        prefix_cache="radix",
        speculative_config={"method": "ngram", "num_speculative_tokens": 2, **ALWAYS},
    )
    got = _samples(spec, 600)
    assert spec.engine.speculative.total.num_draft_tokens > 300  # verification did run
    stat, crit = _chi2_two_sample(plain_samples, got)
    assert stat < crit, (stat, crit)


def test_the_distribution_check_catches_a_wrong_verifier(
    tiny_model: Path, plain_samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sagellm.engine.speculation import SpeculativeDecoder

    # accepting every draft (no rejection step) changes what is sampled
    monkeypatch.setattr(
        SpeculativeDecoder,
        "_rejection",
        staticmethod(lambda probs, drafts, q, row: [*drafts, int(probs[len(drafts)].argmax())]),
    )
    spec = make_llm(
        tiny_model,
        num_blocks=512,
        max_model_len=512,
        prefix_cache="radix",
        speculative_config={"method": "ngram", "num_speculative_tokens": 2, **ALWAYS},
    )
    stat, crit = _chi2_two_sample(plain_samples, _samples(spec, 600))
    assert stat > crit, (stat, crit)


def test_metrics_publish_the_speculative_series() -> None:
    pytest.importorskip("prometheus_client")
    from sagellm.engine.metrics import PrometheusPublisher
    from sagellm.engine.speculation import SpeculativeStats

    pub = PrometheusPublisher(model_name="m")
    stats = SpeculativeStats(
        num_drafts=4, num_draft_tokens=20, num_accepted_tokens=15, num_emitted_tokens=19
    )
    pub.publish({"speculative": stats})
    text = pub.render().decode()
    for line in (
        'sagellm_speculative_num_draft_tokens_total{model_name="m"} 20.0',
        'sagellm_speculative_num_accepted_tokens_total{model_name="m"} 15.0',
        'sagellm_speculative_acceptance_rate{model_name="m"} 0.75',
        'sagellm_speculative_mean_accepted_length{model_name="m"} 4.75',
    ):
        assert line in text, line


def test_the_draft_model_proposer_frees_its_blocks(tiny_model: Path) -> None:
    """The draft runtime's own pool holds nothing once every request has finished."""
    llm, _ = _run(
        tiny_model,
        {"method": "draft", "num_speculative_tokens": 3, "num_blocks": 64, **ALWAYS},
        num_blocks=256,
    )
    proposer = llm.engine.speculative.proposer
    assert proposer.pool.num_free_blocks == proposer.pool.num_blocks == 64
    # the target as its own draft: every draft is accepted
    stats = llm.engine.speculative.total
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0


def _medusa_heads(tiny_model: Path, folder: Path, identity: bool) -> dict:
    """Heads for the tiny model: random ones, or head 0 equal to the target's own head
    (zero residual block: it then drafts the token the target just produced)."""
    from safetensors.torch import load_file

    from sagellm.speculative import save_heads

    weights: dict = {}
    for f in sorted(tiny_model.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    head_w = weights["lm_head.weight"].float()
    vocab, hidden = head_w.shape
    g = torch.Generator().manual_seed(7)
    heads = []
    for i in range(3):
        if identity and i == 0:
            heads.append((torch.zeros(hidden, hidden), torch.zeros(hidden), head_w.clone()))
        else:
            heads.append(
                (
                    torch.randn(hidden, hidden, generator=g) * 0.02,
                    torch.zeros(hidden),
                    torch.randn(vocab, hidden, generator=g),
                )
            )
    save_heads(folder, heads)
    return {"method": "medusa", "model": str(folder), "num_speculative_tokens": 3, **ALWAYS}


@pytest.mark.parametrize("prefix", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_medusa_heads_leave_greedy_outputs_unchanged(
    tiny_model: Path, baseline, tmp_path: Path, prefix: bool
) -> None:
    spec = _medusa_heads(tiny_model, tmp_path, identity=False)
    opts = {"num_blocks": 256, **({"prefix_cache": "radix"} if prefix else {})}
    llm, got = _run(tiny_model, spec, repeat=2, **opts)
    assert got == baseline
    assert llm.engine.speculative.total.num_draft_tokens > 0


def test_medusa_gets_the_hidden_state_of_the_newest_token(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head 0 is the target's own head: from the hidden state of the row that produced the
    newest token it drafts that very token, on every proposal (and with drafts accepted,
    the row of the last accepted one)."""
    from sagellm.speculative import MedusaProposer

    seen: list[tuple[int, int]] = []
    original = MedusaProposer.propose

    def recording(self, requests):  # type: ignore[no-untyped-def]
        drafts = original(self, requests)
        for r, d in zip(requests, drafts):
            assert r.hidden_state is not None
            seen.append((r.output_token_ids[-1], d.token_ids[0]))
        return drafts

    monkeypatch.setattr(MedusaProposer, "propose", recording)
    spec = _medusa_heads(tiny_model, tmp_path, identity=True)
    _run(tiny_model, spec, num_blocks=256)
    assert len(seen) > 10
    assert all(newest == first for newest, first in seen)
