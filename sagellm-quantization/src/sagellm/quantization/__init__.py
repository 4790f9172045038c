"""sagellm.quantization: linear methods on torch's CPU int4/int8 kernels and the quantizers
that choose them (group ``sagellm.quantization``): ``gguf`` (a GGUF checkpoint's own
blocks), ``int8`` / ``int4`` (round-to-nearest), ``gptq`` and ``awq`` (int4 calibrated on
the text the package ships) and ``smoothquant`` (W8A8 through ``torch._int_mm``).

Usage (what the engine's runtime does after loading a model)::

    from sagellm.core import registry

    quantizer = registry.load("quantization", "gptq", {"group_size": 64}, tokenize=tok.encode)
    layers = model.projections()  # {"layers.0.qkv_proj": Linear, ..., "lm_head": Linear}
    quantizer.prepare(layers, run)  # run(token_ids) -> logits of the float model
    for name, layer in layers.items():
        method = quantizer.linear_method(name, layer)
        if method is not None:
            layer.set_method(method)  # method.process_weights(layer), then method.apply

Accuracy offline: :mod:`sagellm.quantization.eval`; kernel timings:
``python -m sagellm.quantization.bench``.
"""

from sagellm.quantization._version import __version__

__all__ = ["__version__"]
