"""Conformance suite of :class:`sagellm.core.protocols.Proposer`.

A subclass provides ``make_proposer(num_speculative_tokens)``. Model-based proposers set
``vocab_size`` to their vocabulary (token ids drawn for the tests stay below it) and
``copies_context = False`` when they do not draft from the context (random heads).
"""

from __future__ import annotations

from typing import Any, ClassVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagellm.core.protocols import Proposer
from sagellm.core.types import DraftRequest, SpeculativeDraft

__all__ = ["ProposerConformance"]


class ProposerConformance:
    """Behaviour every proposer shares; see the module docstring for the factory."""

    #: token ids used by the tests lie in ``0..vocab_size - 1``
    vocab_size: ClassVar[int] = 64
    #: the proposer drafts a repeated span of the context when it recurs (lookup, trees)
    copies_context: ClassVar[bool] = True
    max_examples: ClassVar[int] = 60

    def make_proposer(self, num_speculative_tokens: int) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def _check_drafts(
        self, proposer: Any, requests: list[DraftRequest], drafts: list[SpeculativeDraft]
    ) -> None:
        assert isinstance(drafts, list)
        assert [d.request_id for d in drafts] == [r.request_id for r in requests]
        for req, d in zip(requests, drafts):
            assert isinstance(d, SpeculativeDraft)
            assert isinstance(d.token_ids, tuple)
            assert len(d.token_ids) <= min(req.num_tokens, proposer.num_speculative_tokens)
            assert all(isinstance(t, int) and 0 <= t < self.vocab_size for t in d.token_ids)
            if d.draft_probs is not None:
                probs = d.draft_probs
                assert tuple(probs.shape) == (len(d.token_ids), self.vocab_size)
                assert bool((probs >= 0).all())
                sums = probs.sum(dim=-1)
                assert bool(((sums - 1).abs() < 1e-3).all()), sums

    # ------------------------------------------------------------------ tests

    def test_satisfies_protocol(self) -> None:
        proposer = self.make_proposer(4)
        assert isinstance(proposer, Proposer)
        assert proposer.num_speculative_tokens == 4
        assert isinstance(type(proposer).config_class, type)

    def test_no_requests_no_drafts(self) -> None:
        assert self.make_proposer(3).propose([]) == []

    def test_zero_budget_gives_empty_drafts(self) -> None:
        proposer = self.make_proposer(4)
        tokens = [1, 2, 3, 4] * 6
        reqs = [DraftRequest("a", tokens, tokens[:5], 0), DraftRequest("b", tokens, [], 0)]
        drafts = proposer.propose(reqs)
        assert [d.token_ids for d in drafts] == [(), ()]

    def test_budget_caps_the_draft(self) -> None:
        proposer = self.make_proposer(6)
        tokens = [5, 6, 7, 8, 9, 10, 11] * 4
        for budget in (1, 2, 6, 12):
            req = DraftRequest("r", tokens, [5, 6], budget)
            [draft] = proposer.propose([req])
            self._check_drafts(proposer, [req], [draft])
            if self.copies_context:
                # the context ends in 5, 6: the span after it repeats
                want = (7, 8, 9, 10, 11, 5)[: min(budget, 6)]
                assert draft.token_ids == want

    def test_one_draft_per_request_in_order(self) -> None:
        proposer = self.make_proposer(3)
        reqs = [
            DraftRequest("z", [1, 2, 3, 1, 2], [], 3),
            DraftRequest("a", [9], [], 3),
            DraftRequest("m", [4, 4, 4, 4], [4], 2),
        ]
        drafts = proposer.propose(reqs)
        self._check_drafts(proposer, reqs, drafts)

    def test_finished_and_unknown_requests_are_fine(self) -> None:
        proposer = self.make_proposer(3)
        req = DraftRequest("r", [1, 2, 3, 1, 2], [3], 3)
        self._check_drafts(proposer, [req], proposer.propose([req]))
        proposer.observe_finished("r", [1, 2, 3, 1, 2], [3])
        proposer.observe_finished("never-seen", [1], [])
        # the same id may come back as a new request with other tokens
        again = DraftRequest("r", [7, 8], [], 3)
        self._check_drafts(proposer, [again], proposer.propose([again]))

    def test_context_may_shrink(self) -> None:
        # a preempted request's id keeps its tokens, but an aborted id can be reused
        proposer = self.make_proposer(3)
        long = DraftRequest("r", [1, 2, 3] * 8, [1, 2], 3)
        proposer.propose([long])
        short = DraftRequest("r", [4, 5], [], 3)
        self._check_drafts(proposer, [short], proposer.propose([short]))

    def test_any_token_sequence(self) -> None:
        proposer = self.make_proposer(4)
        vocab = self.vocab_size

        @settings(
            max_examples=self.max_examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(
            prompt=st.lists(st.integers(0, min(vocab, 6) - 1), min_size=1, max_size=40),
            output=st.lists(st.integers(0, min(vocab, 6) - 1), max_size=20),
            budget=st.integers(0, 8),
            finish=st.booleans(),
        )
        def check(prompt: list[int], output: list[int], budget: int, finish: bool) -> None:
            req = DraftRequest("p", prompt, output, budget)
            drafts = proposer.propose([req])
            self._check_drafts(proposer, [req], drafts)
            if finish:
                proposer.observe_finished("p", prompt, output)

        check()

    def test_context_copy_is_exact(self) -> None:
        if not self.copies_context:
            return
        proposer = self.make_proposer(4)
        document = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
        prompt = [1, *document, 2, 3]
        # the output has started quoting the document: 12 13 -> 14 15 16 17
        req = DraftRequest("q", prompt, [10, 11, 12, 13], 4)
        [draft] = proposer.propose([req])
        assert draft.token_ids == (14, 15, 16, 17)
