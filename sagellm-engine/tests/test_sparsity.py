"""Pruning from the engine's options: --sparsity, LLM(sparsity=...), SAGELLM_SPARSITY."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sagellm.core.types import SamplingParams
from sagellm.engine.args import add_engine_arguments, engine_config_from_args, make_engine_config
from sagellm.engine.builder import EngineBuilder
from sagellm.engine.runtime.config import parse_spec

from .conftest import make_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_the_flag_reaches_the_runtime_options() -> None:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--sparsity", "wanda,sparsity=0.5", "-q", "int8"])
    config, _ = engine_config_from_args(args)
    assert config.sparsity == "wanda,sparsity=0.5" and config.quantization == "int8"
    options = EngineBuilder(config).runtime_options()
    assert options["sparsity"] == "wanda,sparsity=0.5"
    assert "sparsity" not in EngineBuilder(make_engine_config()[0]).runtime_options()


def test_environment_and_keyword() -> None:
    config, _ = make_engine_config(environ={"SAGELLM_SPARSITY": "magnitude,pattern=2:4"})
    assert config.sparsity == "magnitude,pattern=2:4"
    config, _ = make_engine_config(
        environ={"SAGELLM_SPARSITY": "magnitude"}, sparsity="structured,ffn_sparsity=0.2"
    )
    assert config.sparsity == "structured,ffn_sparsity=0.2"


def test_parse_spec() -> None:
    assert parse_spec("wanda,sparsity=0.5,pattern=2:4,semi_structured=off") == (
        "wanda",
        {"sparsity": 0.5, "pattern": "2:4", "semi_structured": "off"},
    )
    assert parse_spec("structured") == ("structured", {})
    with pytest.raises(ValueError, match="option 'x' of 'wanda,x' is not key=value"):
        parse_spec("wanda,x")
    with pytest.raises(ValueError, match="names no method"):
        parse_spec(",sparsity=0.5")


def test_llm_generates_with_a_structured_model(tiny_model: Path) -> None:
    pytest.importorskip("sagellm.sparsity")
    spec = (
        "structured,ffn_sparsity=0.5,head_sparsity=0.5,channel_multiple=32,calibration_tokens=128"
    )
    llm = make_llm(tiny_model, sparsity=spec, quantization="none", num_blocks=64)
    rt = llm.engine.runtime
    assert rt.sparsity == spec and rt.block_shapes
    assert all(s.num_heads == 2 for s in rt.block_shapes.values())  # 4 heads, 2 KV groups
    out = llm.generate(["hello there", "a b c"], GREEDY)
    assert [len(o.outputs[0].token_ids) for o in out] == [6, 6]
    # the same tokens as the runtime's own greedy run over the prompt
    prompt = list(out[0].prompt_token_ids)
    logits = rt.run_sequence(prompt)
    assert out[0].outputs[0].token_ids[0] == int(logits[-1].argmax())
