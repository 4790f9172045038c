"""The Llama family (Llama, Qwen2, Mistral, SmolLM) in plain PyTorch over a paged KV cache.

Tokens of every request in a step are flattened into one ``[T, hidden]`` batch, so all
projections run as one matrix product per layer whatever the mix of prefill chunks and
decodes; only attention looks at sequence boundaries (see :mod:`..layers.attention`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sagellm.core.types import BlockShape, PackedWeight
from sagellm.engine.layers.activation import SiluAndMul
from sagellm.engine.layers.attention import Attention, AttentionMetadata
from sagellm.engine.layers.embedding import LMHead, VocabEmbedding
from sagellm.engine.layers.linear import Linear
from sagellm.engine.layers.rms_norm import FUSED_MAX_ROWS, RMSNorm
from sagellm.engine.layers.rotary import RotaryEmbedding
from sagellm.engine.models.config import ModelConfig

__all__ = ["LlamaDecoderLayer", "LlamaForCausalLM"]

#: KV cache dtypes the fused rotary + KV write kernel stores into (the 1-byte ones as
#: quantized rows with their scales).
_FUSED_KV_CACHES = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int8,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
)

#: Progress callback: (stage, done, total).
Progress = Callable[[str, int, int], None]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention block and SwiGLU MLP, each with a residual connection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = Linear(
            cfg.hidden_size, (self.q_size, self.kv_size, self.kv_size), bias=cfg.attention_bias
        )
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.o_proj = Linear(self.q_size, (cfg.hidden_size,))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = Linear(cfg.hidden_size, (cfg.intermediate_size,) * 2)
        self.act = SiluAndMul()
        self.down_proj = Linear(cfg.intermediate_size, (cfg.hidden_size,))
        # a kernel provider's fused rotary + KV write; None: eager rotary and index_copy_
        self.rotary_kv_kernel: Callable[..., None] | None = None

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            x = self.input_layernorm(hidden)
        else:
            x, residual = self.input_layernorm.add_forward(hidden, residual)
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        fused = self.rotary_kv_kernel is not None and kv_cache[0].dtype in _FUSED_KV_CACHES
        if fused:
            # cos/sin are the float32 tables: rotate q and k in place, write k and v
            assert self.rotary_kv_kernel is not None and meta.positions is not None
            self.rotary_kv_kernel(
                qkv,
                meta.positions,
                cos,
                sin,
                self.num_heads,
                self.num_kv_heads,
                kv_cache[0],
                kv_cache[1],
                meta.slot_mapping,
            )
            q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(
                t, self.num_kv_heads, self.head_dim
            )
        else:
            # q and k rotate together: one rotary application for both
            qk = qkv[:, : self.q_size + self.kv_size].view(
                t, self.num_heads + self.num_kv_heads, -1
            )
            qk = RotaryEmbedding.rotate(qk, cos, sin)
            q = qk[:, : self.num_heads]
            k = qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        attn = self.attn(q, k, v, kv_cache[0], kv_cache[1], meta, kv_written=fused)
        hidden = self.o_proj(attn)
        x, residual = self.post_attention_layernorm.add_forward(hidden, residual)
        hidden = self.down_proj(self.act(self.gate_up_proj(x)))
        return hidden, residual


class LlamaForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and the head (tied or separate)."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(
            cfg.vocab_size, cfg.hidden_size, self.embed_tokens if cfg.tie_word_embeddings else None
        )
        self.rotary = RotaryEmbedding(
            cfg.head_dim,
            max_positions or cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
        )
        self.fused_rotary = False  # layers rotate through a fused kernel (see use_kernels)
        # a kernel provider's whole-stack decode step (see use_decode_step); None: the
        # layers one by one
        self.decode_step: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        self.decode_step_rows = 0  # decode steps of fewer rows than this use it
        # (rank, world) once sharded for tensor parallelism (sagellm.engine.models.shard)
        self.tensor_parallel: tuple[int, int] | None = None

    def use_kernels(self, ops: Any) -> None:
        """Route norms, SwiGLU and rotary + KV write through ``ops`` (a kernel module with
        ``rms_norm``, ``add_rms_norm``, ``silu_and_mul``, ``rotary_write_kv``; and
        optionally ``fused_ops_vectorized(dtype)``: then the element-wise ones run at every
        row count, not only on small steps)."""
        vectorized = getattr(ops, "fused_ops_vectorized", None)
        rows = FUSED_MAX_ROWS
        if vectorized is not None and vectorized(self.norm.weight.dtype):
            rows = sys.maxsize
        for module in self.modules():
            if isinstance(module, (RMSNorm, SiluAndMul)):
                module.kernels = ops
                module.fused_max_rows = rows
            elif isinstance(module, LlamaDecoderLayer):
                module.rotary_kv_kernel = ops.rotary_write_kv
        self.fused_rotary = True

    def use_decode_step(self, make: Callable[..., Any]) -> bool:
        """Run few-row decode steps through ``make``'s fused step over all the layers.

        ``make(layers, *, num_kv_heads, head_dim, eps)`` is a kernel provider's
        ``decode_step`` factory; each layer spec names the norms' weights, the query heads
        and the four projections. It returns None when it cannot take these layers (their
        projections' methods are not ones it computes), and the layers run one by one.
        Call after quantization and :meth:`use_kernels`: the step takes the projections'
        weights as their methods hold them then. Whether it is used.
        """
        self.decode_step, self.decode_step_rows = None, 0
        if not self.fused_rotary:
            return False  # the step rotates and writes KV as the fused kernels do
        if self.tensor_parallel is not None:
            return False  # the step has no all-reduce between its layers' halves
        specs = []
        for module in self.layers:
            layer: LlamaDecoderLayer = module  # type: ignore[assignment]
            specs.append(
                {
                    "input_norm": layer.input_layernorm.weight,
                    "post_norm": layer.post_attention_layernorm.weight,
                    "num_heads": layer.num_heads,
                    "qkv": layer.qkv_proj,
                    "o": layer.o_proj,
                    "gate_up": layer.gate_up_proj,
                    "down": layer.down_proj,
                }
            )
        cfg = self.config
        step = make(
            specs, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, eps=cfg.rms_norm_eps
        )
        if step is None:
            return False
        # the norms and SwiGLU run the fused kernels up to their row limit; beyond it the
        # layers' eager ops would round differently
        norm: RMSNorm = self.layers[0].input_layernorm  # type: ignore[assignment]
        self.decode_step = step
        self.decode_step_rows = min(int(step.max_rows), norm.fused_max_rows + 1)
        return True

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logit_rows: torch.Tensor | None = None,
        *,
        head: bool = True,
    ) -> torch.Tensor:
        """Run ``[T]`` tokens; return float32 logits of ``logit_rows`` (all rows if None).

        ``head=False``: the final-norm hidden states of those rows instead (compute dtype),
        for pooling (embeddings) and for callers that apply ``lm_head`` to a subset."""
        hidden = self.embed_tokens(token_ids)
        if self.fused_rotary and kv_caches[0][0].dtype in _FUSED_KV_CACHES:
            # the layers' fused rotary + KV write
            cos, sin = self.rotary.cos, self.rotary.sin  # whole float32 tables
        else:
            cos, sin = self.rotary.tables(positions, hidden.dtype)
        residual: torch.Tensor | None = None
        if self._fused_decode(token_ids.shape[0], kv_caches, meta):
            assert self.decode_step is not None and meta.positions is not None
            assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
            hidden, residual = self.decode_step(
                hidden.contiguous(),
                meta.positions,
                meta.slot_mapping,
                kv_caches,
                meta.decode_block_tables,
                meta.decode_context_lens,
                cos,
                sin,
            )
        else:
            for layer, cache in zip(self.layers, kv_caches):
                hidden, residual = layer(hidden, residual, cos, sin, cache, meta)
        assert residual is not None
        if logit_rows is not None:
            hidden = hidden.index_select(0, logit_rows)
            residual = residual.index_select(0, logit_rows)
        x, _ = self.norm.add_forward(hidden, residual)
        return self.lm_head(x) if head else x

    def _fused_decode(
        self,
        rows: int,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> bool:
        """Whether this step goes through :attr:`decode_step`: decodes only, read by the
        paged kernel, from a cache the fused KV write stores, and few enough rows."""
        return (
            self.decode_step is not None
            and 0 < rows < self.decode_step_rows
            and meta.num_decodes == rows
            and not meta.chunks
            and meta.decode_block_tables is not None
            and meta.positions is not None
            and kv_caches[0][0].dtype in _FUSED_KV_CACHES
        )

    def resize_blocks(self, shapes: Mapping[int, BlockShape]) -> None:
        """Take the per-block shapes a structured sparsifier left (its projections already
        shrunk): those blocks attend with fewer query heads. KV heads cannot change (the
        KV cache has one layout for every layer). Raises ValueError naming the first
        projection whose size does not match its block's shape."""
        hd = self.config.head_dim
        for index, shape in shapes.items():
            if not 0 <= index < len(self.layers):
                raise ValueError(f"block {index} does not exist ({len(self.layers)} blocks)")
            layer: LlamaDecoderLayer = self.layers[index]  # type: ignore[assignment]
            if shape.num_kv_heads != layer.num_kv_heads or shape.num_heads % shape.num_kv_heads:
                raise ValueError(
                    f"block {index}: {shape.num_heads} query heads over {shape.num_kv_heads} "
                    f"KV heads do not fit the model's {layer.num_kv_heads} KV heads"
                )
            q, kv, inter = shape.num_heads * hd, layer.kv_size, shape.intermediate_size
            want: dict[str, tuple[object, object]] = {
                "qkv_proj": (tuple(layer.qkv_proj.output_sizes), (q, kv, kv)),
                "o_proj": (layer.o_proj.input_size, q),
                "gate_up_proj": (tuple(layer.gate_up_proj.output_sizes), (inter, inter)),
                "down_proj": (layer.down_proj.input_size, inter),
            }
            for name, (got, expected) in want.items():
                if got != expected:
                    raise ValueError(
                        f"layers.{index}.{name} has size {got}; the block's shape needs {expected}"
                    )
            layer.num_heads = layer.attn.num_heads = shape.num_heads
            layer.q_size = q
            layer.attn.group = shape.num_heads // shape.num_kv_heads

    # ------------------------------------------------------------------ weights

    def projections(self) -> dict[str, Linear]:
        """Every projection by name (``"layers.3.qkv_proj"``, ..., ``"lm_head"``)."""
        out: dict[str, Linear] = {}
        for i, module in enumerate(self.layers):
            layer: LlamaDecoderLayer = module  # type: ignore[assignment]
            for attr in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                out[f"layers.{i}.{attr}"] = getattr(layer, attr)
        out["lm_head"] = self.lm_head
        return out

    def tie_weights(self) -> None:
        """Make the head share the embedding tensor again (after a device or dtype move)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def load_weights(
        self,
        weights: Mapping[str, torch.Tensor],
        progress: Progress | None = None,
        packed: Mapping[str, PackedWeight] | None = None,
    ) -> None:
        """Copy Hugging Face-named tensors in, stacking q/k/v and gate/up.

        ``packed`` holds the checkpoint's quantized blocks of some weights (same names);
        each projection keeps them for a linear method that computes on them.
        Raises ValueError naming the first missing or unexpected tensor.
        """
        packed = packed or {}
        cfg = self.config
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            for candidate in (name, name.removeprefix("model.")):
                if candidate in weights:
                    used.add(candidate)
                    return weights[candidate]
            raise ValueError(f"the checkpoint has no tensor {name!r}")

        def blocks(*names: str) -> list[PackedWeight | None]:
            return [packed.get(n, packed.get(n.removeprefix("model."))) for n in names]

        def copy(dst: torch.Tensor, name: str) -> None:
            src = take(name)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
                )
            dst.copy_(src)

        with torch.no_grad():
            copy(self.embed_tokens.weight, "model.embed_tokens.weight")
            copy(self.norm.weight, "model.norm.weight")
            if not cfg.tie_word_embeddings:
                copy(self.lm_head.weight, "lm_head.weight")
                self.lm_head.packed = blocks("lm_head.weight")[0]
            else:
                self.lm_head.packed = blocks("model.embed_tokens.weight")[0]
            for i, module in enumerate(self.layers):
                layer: LlamaDecoderLayer = module  # type: ignore[assignment]
                p = f"model.layers.{i}."
                copy(layer.input_layernorm.weight, p + "input_layernorm.weight")
                copy(layer.post_attention_layernorm.weight, p + "post_attention_layernorm.weight")
                qkv = [f"{p}self_attn.{n}_proj.weight" for n in ("q", "k", "v")]
                layer.qkv_proj.load_parts(
                    [take(n) for n in qkv],
                    [take(n.replace(".weight", ".bias")) for n in qkv]
                    if cfg.attention_bias
                    else None,
                    blocks(*qkv),
                )
                o = p + "self_attn.o_proj.weight"
                layer.o_proj.load_parts([take(o)], packed=blocks(o))
                gate_up = (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
                layer.gate_up_proj.load_parts([take(n) for n in gate_up], packed=blocks(*gate_up))
                down = p + "mlp.down_proj.weight"
                layer.down_proj.load_parts([take(down)], packed=blocks(down))
                if progress is not None:
                    progress("assemble", i + 1, cfg.num_layers)
        # a tied checkpoint may still carry lm_head.weight (equal to the embedding)
        extra = set(weights) - used - {"lm_head.weight"}
        extra = {n for n in extra if "rotary_emb" not in n}
        if extra:
            raise ValueError(
                f"the checkpoint has tensors this model does not use: {sorted(extra)[:5]}"
            )
