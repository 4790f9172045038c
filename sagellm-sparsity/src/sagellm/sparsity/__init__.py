"""sagellm.sparsity: pruning of a model's projections (group ``sagellm.sparsity``).

``magnitude``, ``wanda`` and ``sparsegpt`` zero weights (unstructured at any fraction, or
n:m such as 2:4 and 4:8; on CUDA 2:4 projections compute through torch's semi-structured
sparse kernels); ``structured`` removes whole FFN channels and query heads and shrinks
the dense matrices, so any dense kernel is faster. The calibrating ones run the model
over the public-domain text the package ships.

Usage (what the engine's runtime does after loading a model, before quantizing it)::

    from sagellm.core import registry

    sparsifier = registry.load(
        "sparsity", "structured", {"ffn_sparsity": 0.3}, tokenize=tok.encode, head_dim=64
    )
    layers = model.projections()  # {"layers.0.qkv_proj": Linear, ..., "lm_head": Linear}
    sparsifier.prepare(layers, run)  # run(token_ids) -> logits of the dense model
    shapes = sparsifier.apply(layers)  # {block index: BlockShape} of the shrunk blocks
    model.resize_blocks(shapes)

Quality and speed against the dense model: :mod:`sagellm.sparsity.eval` (the engine's
``python -m sagellm.engine.sparsity_eval`` runs it on its models).
"""

from sagellm.sparsity._version import __version__

__all__ = ["__version__"]
