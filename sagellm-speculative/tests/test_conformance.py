"""Every proposer of the package passes core's Proposer conformance suite."""

from __future__ import annotations

from sagellm.core import registry
from sagellm.core.testing import ProposerConformance
from sagellm.speculative import NgramConfig, NgramProposer, SuffixConfig, SuffixProposer


class TestNgramConformance(ProposerConformance):
    def make_proposer(self, num_speculative_tokens: int) -> NgramProposer:
        return NgramProposer(NgramConfig(num_speculative_tokens=num_speculative_tokens))


class TestSuffixConformance(ProposerConformance):
    def make_proposer(self, num_speculative_tokens: int) -> SuffixProposer:
        return SuffixProposer(SuffixConfig(num_speculative_tokens=num_speculative_tokens))


def test_entry_points_name_the_proposers() -> None:
    registry.reset_cache()
    names = {p.name: p.value for p in registry.available("speculative")}
    assert names == {
        "ngram": "sagellm.speculative.ngram:NgramProposer",
        "suffix": "sagellm.speculative.suffix:SuffixProposer",
    }
    assert registry.load_class("speculative", "ngram") is NgramProposer
