"""Engine options as keyword arguments and CLI flags, mapped onto an EngineConfig.

The offline API (``LLM(model=..., max_num_seqs=...)``) and the CLI
(``--max-num-seqs``) share these names. Engine-wide fields go to the top level of
:class:`EngineConfig`; the shorthands below land in a slot's options; ``kv_cache_mib``
sizes the pool when it has no explicit block count.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from sagellm.core.config import EngineConfig, load_engine_config
from sagellm.core.errors import ConfigError
from sagellm.engine.config import DEFAULT_KV_CACHE_MIB, BuildOptions
from sagellm.engine.disagg import KVTransferSettings
from sagellm.engine.speculation import SpeculativeSettings

__all__ = [
    "SLOT_SHORTHANDS",
    "add_engine_arguments",
    "engine_config_from_args",
    "make_engine_config",
]

#: Keyword -> (slot, option) it sets.
SLOT_SHORTHANDS: Mapping[str, tuple[str, str]] = {
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "num_blocks": ("kv_pool", "num_blocks"),
    # tensor parallelism (the native runtime's ranks)
    "tensor_parallel_size": ("runtime", "tensor_parallel_size"),
    "tensor_parallel_workers": ("runtime", "tensor_parallel_workers"),
    "master_addr": ("runtime", "master_addr"),
    "master_port": ("runtime", "master_port"),
}

#: Keyword -> slot whose implementation it names.
SLOT_NAMES: Mapping[str, str] = {
    "runtime": "runtime",
    "kv_pool": "kv_pool",
    "scheduler": "scheduler",
    "prefix_cache": "prefix_cache",
    "eviction": "eviction",
    "lifetime": "lifetime",
}


def make_engine_config(
    config_path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> tuple[EngineConfig, BuildOptions]:
    """Merge a YAML file, ``SAGELLM_*`` variables and keyword overrides (which win).

    Keywords: every :class:`EngineConfig` field; a slot name with a string
    (``scheduler="fcfs"``) or a ``{name, options}`` mapping; the shorthands of
    :data:`SLOT_SHORTHANDS`; ``kv_cache_mib``. ``None`` values are ignored.
    """
    overrides: dict[str, Any] = {}
    kv_cache_mib = kwargs.pop("kv_cache_mib", None)
    speculative_config = kwargs.pop("speculative_config", None)
    if speculative_config is not None:
        speculative_config = SpeculativeSettings.parse(speculative_config).model_dump()
    kv_transfer_config = kwargs.pop("kv_transfer_config", None)
    if kv_transfer_config is not None:
        kv_transfer_config = KVTransferSettings.parse(kv_transfer_config).model_dump()
    fields = set(EngineConfig.model_fields)
    for key, value in kwargs.items():
        if value is None:
            continue
        if key in SLOT_SHORTHANDS:
            slot, option = SLOT_SHORTHANDS[key]
            entry = overrides.setdefault(slot, {})
            entry.setdefault("options", {})[option] = value
        elif key in SLOT_NAMES:
            entry = overrides.setdefault(SLOT_NAMES[key], {})
            if isinstance(value, str):
                entry["name"] = value
            elif isinstance(value, Mapping):
                # options merge with those shorthands set (tensor_parallel_size, ...)
                value = dict(value)
                options = value.pop("options", None)
                entry.update(value)
                if options:
                    entry.setdefault("options", {}).update(options)
            else:
                raise ConfigError(
                    f"{key} takes an implementation name or a {{name, options}} mapping"
                )
        elif key in fields:
            overrides[key] = value
        else:
            valid = sorted(fields | set(SLOT_SHORTHANDS) | {"kv_cache_mib"})
            raise ConfigError(f"unknown engine option {key!r}; valid options: {', '.join(valid)}")
    config = load_engine_config(config_path, environ=environ, overrides=overrides)
    options = BuildOptions(
        kv_cache_mib=kv_cache_mib or DEFAULT_KV_CACHE_MIB,
        speculative_config=speculative_config,
        kv_transfer_config=kv_transfer_config,
    )
    return config, options


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose and size the engine's components."""
    g = parser.add_argument_group("engine")
    g.add_argument("--config", metavar="YAML", help="engine config file (flags override it)")
    g.add_argument(
        "--model",
        help="embedded model name, GGUF file or safetensors folder (default: smollm2-135m)",
    )
    g.add_argument("--tokenizer", help="tokenizer to use instead of the model's own")
    g.add_argument("--served-model-name", help="model name reported by the API")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="compute dtype")
    g.add_argument("--device", help="torch device (default: cpu)")
    g.add_argument("--threads", type=int, dest="num_threads", help="torch intra-op threads")
    g.add_argument("--block-size", type=int, help="tokens per KV block (default: 16)")
    g.add_argument("--max-model-len", type=int, help="longest prompt + output")
    g.add_argument("--max-num-seqs", type=int, help="requests batched per step")
    g.add_argument("--max-num-batched-tokens", type=int, help="token budget per step")
    g.add_argument("--num-blocks", type=int, help="KV pool blocks (default: from --kv-cache-mib)")
    g.add_argument(
        "--kv-cache-mib",
        type=int,
        help=f"KV pool memory budget in MiB (default: {DEFAULT_KV_CACHE_MIB})",
    )
    g.add_argument("--kv-pool", help="KV pool implementation (default: paged)")
    g.add_argument("--scheduler", help="scheduler implementation (default: fcfs)")
    g.add_argument("--prefix-cache", help="prefix index implementation (default: none)")
    g.add_argument("--eviction", help="eviction policy implementation (default: none)")
    g.add_argument("--seed", type=int, help="default seed of requests that give none")
    g.add_argument(
        "--quantization",
        "-q",
        help="weight quantizer: none, gguf, int8, int4, gptq, awq, smoothquant (default: "
        "gguf for a GGUF checkpoint, its quantized blocks computed on natively; none "
        "otherwise)",
    )
    g.add_argument(
        "--sparsity",
        metavar="METHOD[,key=value...]",
        help="prune the model after loading, before quantization: magnitude, wanda, "
        "sparsegpt (options sparsity=0.5 or pattern=2:4 / 4:8) or structured (options "
        "ffn_sparsity=0.3, head_sparsity=0.25: FFN channels and query heads removed, the "
        "matrices shrunk), e.g. --sparsity wanda,sparsity=0.5 (default: dense)",
    )
    g.add_argument(
        "--speculative-config",
        metavar="JSON",
        help='speculative decoding as vLLM spells it, e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 5, "prompt_lookup_max": 3}\' (methods: ngram, suffix; '
        "needs sagellm-speculative; default: none)",
    )
    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        help="ranks that each hold 1/N of every layer (worker processes; the threads are "
        "split between them; default: 1)",
    )
    g.add_argument(
        "--tensor-parallel-workers",
        choices=["spawn", "external"],
        help="spawn: this process starts ranks 1..N-1 on this host (default); external: "
        "they are started with `sagellm tp-worker --rank R` (other hosts)",
    )
    g.add_argument(
        "--master-addr", help="where the tensor-parallel ranks meet (default: 127.0.0.1)"
    )
    g.add_argument(
        "--master-port", type=int, help="its port (default: a free one; external: required)"
    )
    g.add_argument(
        "--kv-transfer-config",
        metavar="JSON",
        help="prefill/decode disaggregation as vLLM spells it: this instance's role and "
        'where the pair meets, e.g. \'{"kv_connector": "torch", "kv_role": "kv_producer", '
        '"kv_port": 29600}\' (prefill) or \'{"kv_connector": "torch", "kv_role": '
        '"kv_consumer", "kv_ip": "10.0.0.1", "kv_port": 29600}\' (decode); connectors: '
        "torch, mooncake, nixl (needs sagellm-kv-transfer; default: none)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "int8", "fp8_e4m3", "fp8_e5m2"],
        help="KV cache element type (default: auto, the compute dtype)",
    )
    g.add_argument(
        "--kernels",
        metavar="NAME[,key=value...]",
        help="kernel provider: eager, fused, ... with its options, e.g. "
        "fused,int8_dense_linear=false (default: fused where installed)",
    )


_ARG_KEYS = (
    "model",
    "tokenizer",
    "served_model_name",
    "dtype",
    "device",
    "num_threads",
    "block_size",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "num_blocks",
    "kv_cache_mib",
    "kv_pool",
    "scheduler",
    "prefix_cache",
    "eviction",
    "seed",
    "quantization",
    "sparsity",
    "kv_cache_dtype",
    "kernels",
    "speculative_config",
    "kv_transfer_config",
    "tensor_parallel_size",
    "tensor_parallel_workers",
    "master_addr",
    "master_port",
)


def engine_config_from_args(args: argparse.Namespace) -> tuple[EngineConfig, BuildOptions]:
    """The config that :func:`add_engine_arguments` flags describe."""
    kwargs = {k: getattr(args, k, None) for k in _ARG_KEYS}
    return make_engine_config(getattr(args, "config", None), **kwargs)
