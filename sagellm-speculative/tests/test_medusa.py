"""Medusa heads: loading and shape checks, drafts from hidden states, conformance."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sagellm.core.errors import ConfigError
from sagellm.core.testing import ProposerConformance
from sagellm.core.types import DraftRequest
from sagellm.speculative import MedusaConfig, MedusaProposer, save_heads

H, V = 8, 64


def _heads(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(H, H, generator=g),
            torch.randn(H, generator=g),
            torch.randn(V, H, generator=g),
        )
        for _ in range(n)
    ]


def test_drafts_are_each_heads_argmax(tmp_path: Path) -> None:
    heads = _heads(3)
    save_heads(tmp_path, heads)
    p = MedusaProposer(MedusaConfig(model=str(tmp_path), num_speculative_tokens=3))
    assert p.heads.num_heads == 3 and (p.heads.hidden_size, p.heads.vocab_size) == (H, V)
    h = torch.randn(2, H, generator=torch.Generator().manual_seed(1))
    want = [
        [int((out @ (x + torch.nn.functional.silu(w @ x + b))).argmax()) for w, b, out in heads]
        for x in h
    ]
    reqs = [
        DraftRequest("a", [1, 2], [3], 3, h[0]),
        DraftRequest("b", [4], [], 2, h[1]),
        DraftRequest("c", [5], [6], 3),  # no hidden state yet: no draft
    ]
    drafts = p.propose(reqs)
    assert [d.token_ids for d in drafts] == [tuple(want[0]), tuple(want[1][:2]), ()]
    assert all(d.draft_probs is None for d in drafts)
    assert MedusaProposer.needs_hidden_states


def test_shapes_are_checked(tmp_path: Path) -> None:
    heads = _heads(2)
    w, b, out = heads[1]
    save_heads(tmp_path / "proj", [heads[0], (w, b, out[:, :4])])
    with pytest.raises(
        ConfigError, match=r"Medusa head 1: projection \(64, 4\), expected \(64, 8\)"
    ):
        MedusaProposer(MedusaConfig(model=str(tmp_path / "proj")))
    save_heads(tmp_path / "vocab", [heads[0], (w, b, out[:32])])
    with pytest.raises(ConfigError, match=r"projection \(32, 8\), expected \(64, 8\)"):
        MedusaProposer(MedusaConfig(model=str(tmp_path / "vocab"), num_speculative_tokens=2))
    save_heads(tmp_path / "ok", heads)
    with pytest.raises(ConfigError, match="num_speculative_tokens=4 exceeds the 2 Medusa heads"):
        MedusaProposer(MedusaConfig(model=str(tmp_path / "ok")))
    target = SimpleNamespace(model_config=SimpleNamespace(hidden_size=16, vocab_size=V))
    with pytest.raises(ConfigError, match="hidden states of size 8; the target's are 16"):
        MedusaProposer(
            MedusaConfig(model=str(tmp_path / "ok"), num_speculative_tokens=2), runtime=target
        )
    with pytest.raises(ConfigError, match="not found"):
        MedusaProposer(MedusaConfig(model=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="needs its heads"):
        MedusaProposer()


def test_unknown_tensors_and_gaps_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    w, b, out = _heads(1)[0]
    save_file({"medusa_head.1.0.linear.weight": w, "medusa_head.1.0.linear.bias": b,
               "medusa_head.1.1.weight": out}, str(tmp_path / "gap.safetensors"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"numbered 0..n-1, found \[1\]"):
        MedusaProposer(
            MedusaConfig(model=str(tmp_path / "gap.safetensors"), num_speculative_tokens=1)
        )
    save_file({"lm_head.weight": out}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="unexpected tensor 'lm_head.weight'"):
        MedusaProposer(
            MedusaConfig(model=str(tmp_path / "other.safetensors"), num_speculative_tokens=1)
        )


class TestMedusaConformance(ProposerConformance):
    vocab_size = V
    copies_context = False

    def make_proposer(self, num_speculative_tokens: int) -> MedusaProposer:
        import tempfile

        folder = tempfile.mkdtemp(prefix="medusa-")
        save_heads(folder, _heads(8))
        return MedusaProposer(
            MedusaConfig(model=folder, num_speculative_tokens=num_speculative_tokens)
        )
