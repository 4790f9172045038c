"""The engine loop on a tiny model: invariances, preemption, n, stops, aborts, errors."""

from __future__ import annotations

import random

import pytest

from sagellm.core.errors import InvalidRequestError
from sagellm.core.types import SLO, FinishReason, SamplingParams
from sagellm.engine.llm import LLM

from .conftest import assert_no_leak, make_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def mixed_prompts(
    num: int, vocab: int, seed: int = 0, lo: int = 3, hi: int = 40
) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(num)]


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_generation_runs_to_max_tokens(llm: LLM) -> None:
    (out,) = llm.generate([[5, 6, 7]], GREEDY)
    c = out.outputs[0]
    assert out.finished and len(c.token_ids) == 8
    assert c.finish_reason is FinishReason.LENGTH and c.stop_reason is None
    assert out.prompt_token_ids == [5, 6, 7]
    assert out.metrics.num_prompt_tokens == 3 and out.metrics.num_output_tokens == 8
    assert out.metrics.ttft is not None and out.metrics.ttft >= 0
    assert out.metrics.tpot is not None and out.metrics.tpot >= 0


def test_text_prompt_is_tokenized_and_output_detokenized(llm: LLM) -> None:
    tok = llm.tokenizer
    (out,) = llm.generate("hello world", GREEDY)
    assert out.prompt == "hello world"
    assert out.prompt_token_ids == tok.encode("hello world")
    c = out.outputs[0]
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_a_request_alone_and_in_a_batch_of_32_gives_the_same_tokens(llm: LLM) -> None:
    prompts = mixed_prompts(32, llm.engine.vocab_size)
    batched = tokens(llm.generate(prompts, GREEDY))
    alone = [tokens(llm.generate([p], GREEDY))[0] for p in prompts[:6]]
    assert batched[:6] == alone
    assert all(len(t) == 8 for t in batched)


def test_chunked_prefill_gives_the_same_tokens(tiny_model) -> None:
    prompts = mixed_prompts(6, 100, seed=1, lo=20, hi=60)
    small = make_llm(tiny_model, max_num_batched_tokens=16, num_blocks=256)
    large = make_llm(tiny_model, max_num_batched_tokens=1024, num_blocks=256)
    assert tokens(small.generate(prompts, GREEDY)) == tokens(large.generate(prompts, GREEDY))
    assert_no_leak(small)
    assert_no_leak(large)


def test_preemption_completes_every_request_with_unchanged_outputs(tiny_model, llm: LLM) -> None:
    prompts = mixed_prompts(8, llm.engine.vocab_size, seed=2, lo=8, hi=12)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reference = tokens(llm.generate(prompts, params))
    # 8 requests x up to 36 tokens need ~72 blocks of 4; give the pool 24.
    small = make_llm(tiny_model, num_blocks=24, max_model_len=64)
    small.engine.make_stats()
    got = tokens(small.generate(prompts, params))
    assert got == reference
    assert small.engine.make_stats().num_preemptions > 0
    assert_no_leak(small)


def test_seeded_sampling_does_not_depend_on_the_batch(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    others = mixed_prompts(7, llm.engine.vocab_size, seed=3)
    alone = tokens(llm.generate([[9, 8, 7, 6]], p))[0]
    batch = [*others[:3], [9, 8, 7, 6], *others[3:]]
    in_batch = tokens(
        llm.generate(
            batch,
            [SamplingParams(temperature=1.0, max_tokens=10)] * 3
            + [p]
            + [SamplingParams(temperature=1.0, max_tokens=10)] * 4,
        )
    )[3]
    assert in_batch == alone


def test_n_greater_than_one_returns_n_completions(llm: LLM) -> None:
    p = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=7, ignore_eos=True)
    (out,) = llm.generate([[4, 5, 6]], p)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent streams
    (again,) = llm.generate([[4, 5, 6]], p)
    assert tokens_all(again) == tokens_all(out)  # the seed fixes all three
    assert out.metrics.num_output_tokens == 18


def tokens_all(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def test_n_greedy_completions_are_identical(llm: LLM) -> None:
    (out,) = llm.generate([[4, 5, 6]], SamplingParams(n=2, temperature=0.0, max_tokens=5))
    assert out.outputs[0].token_ids == out.outputs[1].token_ids


def test_stop_token_ids_end_generation_at_the_first_occurrence(llm: LLM) -> None:
    base = tokens(
        llm.generate(
            [[11, 12, 13]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        )
    )[0]
    stop = base[4]
    first = base.index(stop)
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=(stop,))
    (out,) = llm.generate([[11, 12, 13]], p)
    c = out.outputs[0]
    assert c.token_ids == base[: first + 1]
    assert c.finish_reason is FinishReason.STOP and c.stop_reason == stop


def test_stop_strings_cut_the_text(llm: LLM) -> None:
    p = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    (base,) = llm.generate([[21, 22, 23]], p)
    text = base.outputs[0].text
    assert len(text) >= 8, text
    stop = text[5:8]
    cut = text.index(stop)
    (out,) = llm.generate([[21, 22, 23]], p.model_copy(update={"stop": (stop,)}))
    c = out.outputs[0]
    assert c.text == text[:cut]
    assert c.finish_reason is FinishReason.STOP and c.stop_reason == stop
    (inc,) = llm.generate(
        [[21, 22, 23]],
        p.model_copy(update={"stop": (stop,), "include_stop_str_in_output": True}),
    )
    assert inc.outputs[0].text == text[: cut + len(stop)]


def test_max_model_len_ends_generation(llm: LLM) -> None:
    limit = llm.engine.max_model_len
    prompt = [7] * (limit - 3)
    (out,) = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    )
    assert len(out.outputs[0].token_ids) == 3
    assert out.outputs[0].finish_reason is FinishReason.LENGTH


def test_prompt_longer_than_the_context_is_refused(llm: LLM) -> None:
    limit = llm.engine.max_model_len
    with pytest.raises(
        InvalidRequestError, match=f"the prompt has {limit} tokens but the context holds {limit}"
    ):
        llm.generate([[5] * limit], GREEDY)


def test_invalid_prompts_are_refused(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="the prompt is empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[llm.engine.vocab_size]], GREEDY)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[-1]], GREEDY)


def test_abort_frees_every_block(llm: LLM) -> None:
    engine = llm.engine
    pool = engine.kv_pool
    engine.add_request("a", [5] * 30, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [6] * 10, SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert pool.num_free_blocks < pool.num_blocks
    outs = engine.abort_request(["a", "b", "unknown"])
    assert [o.request_id for o in outs] == ["a", "b"]
    assert all(c.finish_reason is FinishReason.ABORT for o in outs for c in o.outputs)
    assert not engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks


def test_duplicate_request_ids_are_refused(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("dup", [5, 6], GREEDY)
    try:
        with pytest.raises(InvalidRequestError, match="request id 'dup' is already in use"):
            engine.add_request("dup", [5, 6], GREEDY)
    finally:
        engine.abort_request("dup")


def test_logprobs_are_returned_per_token(llm: LLM) -> None:
    p = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True)
    (out,) = llm.generate([[3, 4, 5]], p)
    c = out.outputs[0]
    assert len(c.logprobs) == 4
    for tid, entry in zip(c.token_ids, c.logprobs):
        assert tid in entry and len(entry) == 3  # greedy: the sampled token is the top one
        assert max(entry, key=entry.get) == tid
    assert c.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(c.token_ids, c.logprobs)))


def test_stats_are_collected_from_every_component(llm: LLM) -> None:
    llm.engine.make_stats()
    llm.generate([[5, 6, 7]], GREEDY)
    stats = llm.engine.component_stats()
    assert {"engine", "kv_pool", "scheduler"} <= set(stats)
    eng = stats["engine"]
    assert eng.num_requests_finished == 1 and eng.num_generation_tokens == 8
    assert eng.num_prompt_tokens == 3 and len(eng.ttft_seconds) == 1
    assert stats["kv_pool"].num_blocks == llm.engine.kv_pool.num_blocks


def test_chat_uses_the_chat_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "hello"}]
    (out,) = llm.chat(messages, GREEDY)
    expected = llm.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert out.prompt == expected
    assert out.prompt_token_ids == llm.tokenizer.encode(expected, add_special_tokens=False)
    with pytest.raises(InvalidRequestError, match="messages is empty"):
        llm.chat([], GREEDY)


def test_a_request_added_with_an_slo_reaches_the_scheduler_with_it(llm: LLM) -> None:
    engine = llm.engine
    slo = SLO(ttft_ms=800.0, tpot_ms=120.0)
    engine.add_request("with-slo", [5, 6, 7], GREEDY, slo=slo)
    engine.add_request("without", [5, 6, 8], GREEDY)
    assert engine.scheduler.get_request("with-slo").request.slo == slo
    assert engine.scheduler.get_request("without").request.slo == SLO()
    while engine.has_unfinished_requests():
        engine.step()


def test_run_requests_passes_each_request_its_slo(llm: LLM) -> None:
    from sagellm.engine.bench.kv_workloads import Req, run_requests

    engine = llm.engine
    seen: dict[str, SLO] = {}
    add = engine.scheduler.add_request

    def spy(request):  # what the scheduler receives
        seen[request.request_id] = request.slo
        add(request)

    slo = SLO(ttft_ms=500.0, tpot_ms=100.0)
    engine.scheduler.add_request = spy
    try:
        res = run_requests(engine, [Req([5, 6, 7], 2, slo=slo), Req([5, 6, 9], 2)], "slo")
    finally:
        del engine.scheduler.add_request
    assert seen == {"slo-0": slo, "slo-1": SLO()}
    assert [len(t) for t in res.tokens] == [2, 2]
