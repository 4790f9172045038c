"""sagellm.speculative: draft proposers and the exact verifier for speculative decoding.

Proposers fill the ``sagellm.speculative`` entry-point group (``ngram``: prompt lookup;
``suffix``: suffix trees over the request and recent outputs; ``draft``: a draft model
run through the engine's runtime; ``layer_skip``: the target with layers left out;
``medusa``: heads on the target's last hidden state);
:mod:`.verify` holds the
rejection-sampling rule the engine applies to the target's logits.

Usage::

    from sagellm.core.types import DraftRequest
    from sagellm.speculative import NgramProposer, greedy_accept

    proposer = NgramProposer()
    [draft] = proposer.propose([DraftRequest("r", prompt_ids, output_ids, num_tokens=5)])
    emitted = greedy_accept(target_logits, draft.token_ids)  # target_logits: [k + 1, vocab]
"""

from sagellm.speculative._version import __version__
from sagellm.speculative.config import NgramConfig, SpeculativeConfig, SuffixConfig
from sagellm.speculative.draft import (
    DraftModelConfig,
    DraftModelProposer,
    LayerSkipConfig,
    LayerSkipProposer,
    calibrate_skip_layers,
)
from sagellm.speculative.medusa import MedusaConfig, MedusaHeads, MedusaProposer, save_heads
from sagellm.speculative.ngram import NgramProposer, find_ngram_draft
from sagellm.speculative.suffix import SuffixProposer, SuffixTree
from sagellm.speculative.verify import greedy_accept, num_accepted_greedy, rejection_sample

__all__ = [
    "DraftModelConfig",
    "DraftModelProposer",
    "LayerSkipConfig",
    "LayerSkipProposer",
    "MedusaConfig",
    "MedusaHeads",
    "MedusaProposer",
    "calibrate_skip_layers",
    "NgramConfig",
    "NgramProposer",
    "SpeculativeConfig",
    "SuffixConfig",
    "SuffixProposer",
    "SuffixTree",
    "__version__",
    "find_ngram_draft",
    "greedy_accept",
    "num_accepted_greedy",
    "rejection_sample",
    "save_heads",
]
