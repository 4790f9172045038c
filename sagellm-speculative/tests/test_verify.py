"""The verifier: greedy equality and the exact distribution of rejection sampling."""

from __future__ import annotations

import itertools

import pytest
import torch

from sagellm.speculative import greedy_accept, num_accepted_greedy, rejection_sample


def _logits(rows: list[int], vocab: int = 6) -> torch.Tensor:
    out = torch.zeros(len(rows), vocab)
    for i, t in enumerate(rows):
        out[i, t] = 5.0
    return out


def test_greedy_keeps_drafts_until_the_first_mismatch() -> None:
    logits = _logits([3, 1, 4, 0])
    assert greedy_accept(logits, [3, 1, 4]) == [3, 1, 4, 0]  # all accepted + bonus
    assert greedy_accept(logits, [3, 2, 4]) == [3, 1]  # mismatch at 1: the target's token
    assert greedy_accept(logits, [5, 1, 4]) == [3]
    assert greedy_accept(_logits([2]), []) == [2]
    assert num_accepted_greedy([1, 2, 3], [1, 2, 9]) == 2


def test_shapes_are_checked_with_a_hint() -> None:
    with pytest.raises(ValueError, match=r"give k \+ 1 = 3 rows"):
        greedy_accept(torch.zeros(2, 5), [1, 2])
    with pytest.raises(ValueError, match=r"draft token 7 is outside the vocabulary \[0, 5\)"):
        greedy_accept(torch.zeros(2, 5), [7])
    with pytest.raises(ValueError, match="draft probabilities of shape"):
        rejection_sample(torch.full((2, 5), 0.2), [1], torch.full((2, 5), 0.2))
    with pytest.raises(ValueError, match=r"give k \+ 1 = 2 generators"):
        rejection_sample(torch.full((2, 5), 0.2), [1], None, [None])


def test_point_mass_target_always_accepts_its_own_tokens() -> None:
    p = torch.zeros(3, 4)
    p[0, 2] = p[1, 0] = p[2, 3] = 1.0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert rejection_sample(p, [2, 0], None, [g, g, g]) == [2, 0, 3]
        assert rejection_sample(p, [1, 0], None, [g, g, g]) == [2]


# ------------------------------------------------------------ distribution over many seeds
# A toy target: a Markov chain over 4 tokens (the next token's distribution depends on the
# previous one) and a deliberately different draft model. Three tokens are generated from
# start token 0 by (a) plain sampling and (b) speculation with k = 2 drafts and one verify;
# both must match the chain's exact joint distribution over the 64 triples.

VOCAB = 4
TARGET = torch.tensor(
    [[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.1, 0.2], [0.3, 0.3, 0.3, 0.1], [0.05, 0.05, 0.1, 0.8]]
)
DRAFT = torch.tensor(
    [[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]]
)
N = 12_000
# chi-square critical value, 63 degrees of freedom, p = 0.001
CHI2_CRIT = 103.4


def _exact() -> dict[tuple[int, ...], float]:
    out = {}
    for a, b, c in itertools.product(range(VOCAB), repeat=3):
        out[(a, b, c)] = float(TARGET[0, a] * TARGET[a, b] * TARGET[b, c])
    return out


def _chi2(samples: list[tuple[int, ...]]) -> float:
    exact = _exact()
    counts = dict.fromkeys(exact, 0)
    for s in samples:
        counts[s] += 1
    return sum((counts[key] - N * p) ** 2 / (N * p) for key, p in exact.items())


def _plain(seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    prev, out = 0, []
    for _ in range(3):
        prev = int(torch.multinomial(TARGET[prev], 1, generator=g))
        out.append(prev)
    return tuple(out)


def _speculative(seed: int, deterministic: bool, verifier=rejection_sample) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    prev = 0
    while len(out) < 3:
        drafts, qs, ctx = [], [], prev
        for _ in range(2):
            if deterministic:  # a lookup-style proposer: always the draft model's argmax
                tok = int(DRAFT[ctx].argmax())
            else:
                qs.append(DRAFT[ctx])
                tok = int(torch.multinomial(DRAFT[ctx], 1, generator=g))
            drafts.append(tok)
            ctx = tok
        targets = torch.stack([TARGET[t] for t in [prev, *drafts]])
        q = None if deterministic else torch.stack(qs)
        emitted = verifier(targets, drafts, q, [g, g, g])
        out.extend(emitted)
        prev = out[-1]
    return tuple(out[:3])


def test_plain_sampling_matches_the_chain() -> None:
    assert _chi2([_plain(s) for s in range(N)]) < CHI2_CRIT


@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled-drafts", "point-mass"])
def test_speculative_sampling_keeps_the_target_distribution(deterministic: bool) -> None:
    assert _chi2([_speculative(s, deterministic) for s in range(N)]) < CHI2_CRIT


def test_the_check_detects_a_verifier_that_skips_the_residual() -> None:
    def sloppy(p, drafts, q, gens):  # accepts by the rule but resamples from p, not p - q
        out = []
        for j, x in enumerate(drafts):
            u = float(torch.rand((), generator=gens[j]))
            if u * float(q[j, x]) < float(p[j, x]):
                out.append(x)
                continue
            out.append(int(torch.multinomial(p[j], 1, generator=gens[j])))
            return out
        out.append(int(torch.multinomial(p[-1], 1, generator=gens[-1])))
        return out

    assert _chi2([_speculative(s, False, sloppy) for s in range(N)]) > CHI2_CRIT
