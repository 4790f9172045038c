"""asv benchmarks of sagellm.speculative.

``Propose`` times one step's proposals for 16 requests with 1,024-token contexts (the
lookup runs before every engine step, so its cost adds to every token);
``track_acceptance`` reports, on a seeded copy workload (the output quotes spans of the
prompt with edits), the fraction of draft tokens that a greedy target which copies the
prompt would accept, for both proposers side by side. ``Verify`` times greedy and
rejection-sampling verification of 5 drafts over the embedded model's 49,152-token
vocabulary.
"""

from __future__ import annotations

import random

import torch

from sagellm.core.types import DraftRequest
from sagellm.speculative import (
    NgramConfig,
    NgramProposer,
    SuffixConfig,
    SuffixProposer,
    greedy_accept,
    num_accepted_greedy,
    rejection_sample,
)

VOCAB = 49152


def _copy_workload(seed: int, num_requests: int, length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) pairs: the answer copies prompt spans of 8-40 tokens, with a fresh
    token between spans (an edit)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        prompt = [rng.randrange(VOCAB) for _ in range(length)]
        answer: list[int] = []
        while len(answer) < 128:
            start = rng.randrange(length - 40)
            answer.extend(prompt[start : start + rng.randint(8, 40)])
            answer.append(rng.randrange(VOCAB))
        out.append((prompt, answer))
    return out


def _proposer(method: str, k: int = 5) -> NgramProposer | SuffixProposer:
    if method == "ngram":
        return NgramProposer(NgramConfig(num_speculative_tokens=k))
    return SuffixProposer(SuffixConfig(num_speculative_tokens=k))


class Propose:
    params = [["ngram", "suffix"]]
    param_names = ["method"]

    def setup(self, method: str) -> None:
        self.work = _copy_workload(0, 16, 1024)
        self.proposer = _proposer(method)
        self.requests = [
            DraftRequest(f"r{i}", prompt, answer[:64], 5)
            for i, (prompt, answer) in enumerate(self.work)
        ]
        self.proposer.propose(self.requests)  # per-request trees built outside the timing

    def time_propose_16_requests(self, method: str) -> None:
        self.proposer.propose(self.requests)

    def track_acceptance(self, method: str) -> float:
        """Accepted / proposed draft tokens, decoding each answer with k = 5."""
        proposer = _proposer(method)
        proposed = accepted = 0
        for i, (prompt, answer) in enumerate(self.work[:4]):
            rid, pos = f"a{i}", 1
            while pos < len(answer):
                [d] = proposer.propose([DraftRequest(rid, prompt, answer[:pos], 5)])
                n = num_accepted_greedy(answer[pos:], d.token_ids)
                proposed += len(d.token_ids)
                accepted += n
                pos += n + 1
            proposer.observe_finished(rid, prompt, answer)
        return accepted / max(proposed, 1)

    track_acceptance.unit = "fraction"  # type: ignore[attr-defined]


class Verify:
    def setup(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.logits = torch.randn(6, VOCAB, generator=gen)
        self.probs = torch.softmax(self.logits, dim=-1)
        self.drafts = self.logits.argmax(dim=-1)[:5].tolist()
        self.gens = [torch.Generator().manual_seed(i) for i in range(6)]

    def time_greedy(self) -> None:
        greedy_accept(self.logits, self.drafts)

    def time_rejection_sample(self) -> None:
        rejection_sample(self.probs, self.drafts, None, self.gens)
