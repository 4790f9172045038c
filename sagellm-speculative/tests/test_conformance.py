"""Every proposer of the package passes core's Proposer conformance suite."""

from __future__ import annotations

from speculative_toy_runtime import ToyPool, ToyRuntime

from sagellm.core import registry
from sagellm.core.testing import ProposerConformance
from sagellm.speculative import (
    DraftModelConfig,
    DraftModelProposer,
    NgramConfig,
    NgramProposer,
    SuffixConfig,
    SuffixProposer,
)


class TestNgramConformance(ProposerConformance):
    def make_proposer(self, num_speculative_tokens: int) -> NgramProposer:
        return NgramProposer(NgramConfig(num_speculative_tokens=num_speculative_tokens))


class TestSuffixConformance(ProposerConformance):
    def make_proposer(self, num_speculative_tokens: int) -> SuffixProposer:
        return SuffixProposer(SuffixConfig(num_speculative_tokens=num_speculative_tokens))


class TestDraftModelConformance(ProposerConformance):
    vocab_size = 64
    copies_context = False  # it drafts what its model predicts, not what the context repeats
    max_examples = 30

    def make_proposer(self, num_speculative_tokens: int) -> DraftModelProposer:
        rt = ToyRuntime()
        return DraftModelProposer(
            DraftModelConfig(num_speculative_tokens=num_speculative_tokens),
            draft_runtime=rt,
            kv_pool=ToyPool(rt.kv_cache_schema(4), num_blocks=4096),
        )


def test_entry_points_name_the_proposers() -> None:
    registry.reset_cache()
    names = {p.name: p.value for p in registry.available("speculative")}
    assert names == {
        "ngram": "sagellm.speculative.ngram:NgramProposer",
        "suffix": "sagellm.speculative.suffix:SuffixProposer",
        "draft": "sagellm.speculative.draft:DraftModelProposer",
        "layer_skip": "sagellm.speculative.draft:LayerSkipProposer",
        "medusa": "sagellm.speculative.medusa:MedusaProposer",
    }
    assert registry.load_class("speculative", "ngram") is NgramProposer
