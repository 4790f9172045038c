"""NativeRuntime: the Llama family in PyTorch, executing plans over a bound KV pool."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from pydantic import BaseModel
from torch import nn

from sagellm.core import registry
from sagellm.core.errors import CapabilityMismatchError, ConfigError, SageLLMError
from sagellm.core.protocols import KernelProvider, KVPool, LinearMethod, Quantizer, Sparsifier
from sagellm.core.types import (
    KV_CACHE_DTYPES,
    BlockShape,
    CapabilityDescriptor,
    ExecutionPlan,
    KVCacheSchema,
    ModelOutput,
    SequenceChunk,
)
from sagellm.engine.layers.attention import Attention, AttentionMetadata, ChunkMetadata
from sagellm.engine.layers.linear import Linear
from sagellm.engine.layers.rotary import RotaryEmbedding
from sagellm.engine.models.llama import LlamaForCausalLM
from sagellm.engine.models.loader import load_weights
from sagellm.engine.models.source import resolve_model
from sagellm.engine.runtime.batch import StepBatch, build_step_batch, is_decode_chunk
from sagellm.engine.runtime.config import NativeRuntimeConfig, parse_spec
from sagellm.engine.runtime.tensor_parallel import TensorParallelError, TensorParallelGroup

__all__ = ["NativeRuntime", "RowOutput", "apply_sparsifier", "kv_schema_of", "resolve_dtype"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_KV_DTYPES = {"float32", "bfloat16", "float16"}
#: Quantized KV cache types (rows of head_dim values, then a float16 scale in 2 bytes).
_QUANTIZED_KV_DTYPES = {"int8", "float8_e4m3fn", "float8_e5m2"}
#: Cache types a kernel provider's paged_decode_attention reads (float, and int8 with its
#: scales in place); decodes over float8 caches gather and dequantize instead.
_PAGED_DECODE_KV_DTYPES = {"float32", "bfloat16", "float16", "int8"}
_KV_SCALE_BYTES = 2
#: Every KV element type the native runtime stores (and the schedule replay lays out).
KV_DTYPES = frozenset(_KV_DTYPES | _QUANTIZED_KV_DTYPES)


@dataclass(frozen=True)
class RowOutput(ModelOutput):
    """A :class:`ModelOutput` with every row of some requests' chunks as well.

    Returned by :meth:`NativeRuntime.execute` when it is asked for ``hidden_ids`` or
    ``prompt_logit_ids``; ``logits`` and ``request_ids`` are exactly what a plain
    execution returns.
    """

    # request id -> final-norm hidden states of each position of its chunk, [n, hidden] fp32
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    # request id -> logits of each position of its chunk, [n, vocab] float32
    prompt_logits: dict[str, torch.Tensor] = field(default_factory=dict)


def _chunk_rows(chunks: Sequence[SequenceChunk]) -> dict[str, range]:
    """The rows of each chunk in the flattened batch (decode rows first, as the batch
    puts them; then multi-token chunks in plan order)."""
    rows: dict[str, range] = {}
    start = 0
    for decode_rows in (True, False):
        for c in chunks:
            if is_decode_chunk(c) == decode_rows:
                n = len(c.token_ids)
                rows[c.request_id] = range(start, start + n)
                start += n
    return rows


def kv_schema_of(mc: Any, block_size: int, dtype: str) -> KVCacheSchema:
    """The native runtime's KV layout for model config ``mc`` with elements of ``dtype``
    (a quantized type carries its float16 scale per row)."""
    return KVCacheSchema(
        num_layers=mc.num_layers,
        num_kv_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        block_size=block_size,
        dtype=dtype,  # type: ignore[arg-type]
        scale_bytes=_KV_SCALE_BYTES if dtype in _QUANTIZED_KV_DTYPES else 0,
    )


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Uninitialised storage for every meta parameter and buffer of ``model`` on
    ``device``, floating ones in ``dtype`` (the weights are copied in next).

    ``torch.empty`` of each shape directly: ``Module.to_empty(...).to(dtype)`` would hold a
    float32 copy of the whole model on the way, and its ``empty_like`` on meta tensors
    runs the meta device's Python references, which import torch's compiler stack
    (sympy and the symbolic-shapes machinery) for the life of the process.
    """
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                t = torch.empty(
                    p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device=device
                )
                module._parameters[name] = nn.Parameter(t, requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and b.device.type == "meta":
                module._buffers[name] = torch.empty(
                    b.shape, dtype=dtype if b.is_floating_point() else b.dtype, device=device
                )


def _release_freed_memory() -> None:
    """Hand memory freed by loading back to the OS (glibc keeps freed heap pages)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _block_weights(layers: dict[str, Linear]) -> int:
    """Non-zero weights of the decoder blocks' projections."""
    return sum(
        int(torch.count_nonzero(layer.weight))
        for name, layer in layers.items()
        if name.startswith("layers.") and isinstance(layer.weight, torch.Tensor)
    )


def apply_sparsifier(
    model: LlamaForCausalLM,
    sparsifier: Sparsifier,
    run: Callable[[Sequence[int]], object],
) -> dict[int, BlockShape]:
    """Prune ``model`` in place: calibrate with ``run``, prune, resize the shrunk blocks,
    and give each projection the sparsifier's method where it has one (a quantizer set
    later replaces it). The new block shapes; ConfigError for a pattern the model's
    shapes do not take."""
    layers = model.projections()
    try:
        sparsifier.prepare(layers, run)
        shapes = sparsifier.apply(layers)
        model.resize_blocks(shapes)
    except ValueError as exc:
        raise ConfigError(f"sparsity {sparsifier.profile().method!r}: {exc}") from exc
    for layer_name, layer in layers.items():
        method = sparsifier.linear_method(layer_name, layer)
        if method is not None:
            layer.set_method(method)
    return shapes


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for config value ``name`` on ``device``.

    "auto" is bfloat16 on a CPU with native bf16 matrix units (AVX512-BF16 / AMX) and on
    CUDA devices that support it, float32 otherwise. Measured on SmolLM2-135M (Zen 4):
    bf16 matmul runs ~3x the float32 rate at 64 rows and ~1.2x at one row; over 4 chat
    prompts x 24 greedy steps, bf16 logits differ from float32 by at most 3.3% of the
    logit scale (median 1.6%) and pick the same top-1 token 93 times out of 96.
    """
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class NativeRuntime:
    """Runs execution plans on a Llama-family model (implements ``protocols.Runtime``).

    Every prefill chunk and decode token of a plan goes through one forward pass as a
    flattened ``[T, hidden]`` batch; attention reads and writes the bound pool's blocks.
    Logits are computed only for the chunks that sample, in plan order.

    Usage::

        rt = NativeRuntime(NativeRuntimeConfig(model="smollm2-135m", dtype="float32"))
        pool = PagedKVPool(PagedKVPoolConfig(num_blocks=256), schema=rt.kv_cache_schema(16))
        rt.bind_kv_pool(pool)
        out = rt.execute(plan)  # ModelOutput(request_ids, logits [rows, vocab] float32)

    Context: ``progress=`` optional callback ``(stage, done, total)`` called while loading.
    """

    config_class: ClassVar[type[BaseModel]] = NativeRuntimeConfig
    #: execute() takes hidden_ids / prompt_logit_ids (embeddings, prompt logprobs)
    execute_returns_rows: ClassVar[bool] = True

    def __init__(
        self,
        config: NativeRuntimeConfig | None = None,
        *,
        progress: Callable[[str, int, int], None] | None = None,
        **_context: Any,
    ) -> None:
        self.config = config if config is not None else NativeRuntimeConfig()
        cfg = self.config
        try:
            self.device = torch.device(cfg.device)
        except RuntimeError as exc:
            raise ConfigError(f"device {cfg.device!r} is not a torch device: {exc}") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {cfg.device!r} asked for but CUDA is not available")
        self.tp_size, self.tp_rank = cfg.tensor_parallel_size, cfg.tensor_parallel_rank
        self._loaded = False  # set once loading (sharding, quantization, tuning) is done
        self._check_tensor_parallel()
        threads = cfg.num_threads
        if self.tp_size > 1:  # the cores are split between the ranks of one host
            threads = max(1, (threads or os.cpu_count() or 1) // self.tp_size)
        if threads is not None:
            torch.set_num_threads(threads)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        t0 = time.perf_counter()
        self.source = resolve_model(cfg.model)
        self.model_config, weights, packed = load_weights(self.source, progress)
        mc = self.model_config
        if cfg.max_model_len is not None and cfg.max_model_len > mc.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={cfg.max_model_len} exceeds the "
                f"{mc.max_position_embeddings} positions model {self.source.name!r} supports"
            )
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        with torch.device("meta"):
            model = LlamaForCausalLM(mc, max_positions=mc.max_position_embeddings)
        _materialize(model, self.device, self.dtype)
        model.tie_weights()
        model.rotary = RotaryEmbedding(
            mc.head_dim, mc.max_position_embeddings, mc.rope_theta, mc.rope_scaling
        ).to(self.device)
        model.load_weights(weights, progress, packed)
        del weights, packed
        self.tp_comm: Any = None  # the comm backend joining the ranks (tensor parallelism)
        self._tp: TensorParallelGroup | None = None  # rank 0: the workers
        if self.tp_size > 1:
            self.model_config = self._shard(model)
            mc = self.model_config
        self.model = model.eval()
        self._full_config = mc
        self._all_layers = list(model.layers)  # the checkpoint's layers, skipped ones too
        self.skip_layers: tuple[int, ...] = ()
        if cfg.skip_layers:
            self._set_layers(cfg.skip_layers)
        self._pool: KVPool | None = None
        self._caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        # a kernel provider's paged decode attention is installed in the layers; decodes
        # use it when it reads the bound cache's dtype
        self._has_decode_kernel = False
        self._paged_decode = False  # decodes attend through a kernel provider's paged kernel
        self._tokenizer: Any = None  # loaded by tokenize() when a quantizer calibrates
        self.block_shapes: dict[int, BlockShape] = {}  # blocks a sparsifier shrank
        self.pruned_fraction = 0.0  # of the blocks' projection weights (zeros or removed)
        self.sparsity = self._sparsify(progress)
        self.quantization = self._quantize(progress)
        self.kernels = self._use_kernels()
        self.dense_rows = self._tune_dense_rows()
        self.prefill_attention = self._tune_prefill_attention()
        _release_freed_memory()  # the float copies loading went through
        self._loaded = True
        self.load_seconds = time.perf_counter() - t0
        logger.info(
            "loaded %s (%s, %s, sparsity %s, quantization %s, kernels %s) in %.1f s",
            self.source.name,
            self.source.kind,
            str(self.dtype).removeprefix("torch."),
            self.sparsity,
            self.quantization,
            self.kernels,
            self.load_seconds,
        )

    # ------------------------------------------------------------------ tensor parallelism

    def _check_tensor_parallel(self) -> None:
        cfg = self.config
        if cfg.tensor_parallel_rank >= cfg.tensor_parallel_size:
            raise ConfigError(
                f"tensor_parallel_rank={cfg.tensor_parallel_rank} is not below "
                f"tensor_parallel_size={cfg.tensor_parallel_size}"
            )
        if cfg.tensor_parallel_size == 1:
            return
        if cfg.sparsity not in (None, "", "none"):
            raise ConfigError(
                "sparsity with tensor_parallel_size > 1 is not supported (pruning reshapes "
                "the matrices the ranks split); prune and save the model first, or use one rank"
            )
        if cfg.skip_layers:
            raise ConfigError("skip_layers cannot be combined with tensor parallelism")
        if cfg.tensor_parallel_workers == "external" and cfg.master_port == 0:
            raise ConfigError(
                "tensor_parallel_workers='external' needs a master_port every rank knows "
                "(--master-port)"
            )

    def _shard(self, model: LlamaForCausalLM) -> Any:
        """Start or join the group (rank 0 starts local workers) and keep this rank's slice."""
        from sagellm.engine.models.shard import check_shardable, shard_model
        from sagellm.engine.runtime.tensor_parallel import make_comm

        check_shardable(self.model_config, self.tp_size)
        if self.tp_rank == 0:
            if self.config.master_port == 0:
                from sagellm.core.ports import find_free_port

                self.config = self.config.model_copy(update={"master_port": find_free_port()})
            self._tp = TensorParallelGroup(self.config)
            self.tp_comm = self._tp.join()
        else:
            self.tp_comm = make_comm(self.config, self.tp_rank)
        local = shard_model(model, self.tp_rank, self.tp_size, self.tp_comm)
        logger.info(
            "tensor parallel rank %d of %d: %d query heads, %d KV heads, MLP width %d",
            self.tp_rank,
            self.tp_size,
            local.num_heads,
            local.num_kv_heads,
            local.intermediate_size,
        )
        return local

    def close(self) -> None:
        """Stop the tensor-parallel workers (rank 0) or leave their group (a worker)."""
        if self._tp is not None:
            self._tp.close()
            self._tp = None
        elif self.tp_comm is not None:
            self.tp_comm.close()
        self.tp_comm = None

    # ------------------------------------------------------------------ dense threshold

    #: row counts tried for the switch from a quantized layer's few-row kernel to its
    #: float product (the quantizers' default, 16, is the last)
    DENSE_ROW_CANDIDATES = (2, 3, 4, 6, 8, 12, 16)

    def _switching_layers(self) -> dict[str, list[Linear]]:
        """Projections whose method switches from its blocks to a float product at
        ``dense_min_rows``: the decoder layers', and the head's."""
        groups: dict[str, list[Linear]] = {"layers": [], "head": []}
        for name, layer in self.model.projections().items():
            method = layer.method
            rows = getattr(method, "dense_min_rows", None)
            if not isinstance(rows, int) or getattr(method, "blocks", None) is None:
                continue
            if layer.weight is None and layer.dense.name == "dense":
                continue  # no float product to switch to
            groups["head" if name == "lm_head" else "layers"].append(layer)
        return groups

    def _tuning_cache(self, kind: str) -> Path:
        """The file keeping a ``kind`` of measured choice for this machine (CPU flags),
        torch, model, dtype, quantization, kernels (name and build) and thread count."""
        import hashlib
        import os

        flags = ""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = line
                    break
        except OSError:
            pass
        key = "|".join(
            (
                flags,
                torch.__version__,
                self.source.name,
                str(self.dtype),
                str(self.quantization),
                str(self.kernels),
                # the provider's build, where it names one: new kernels measure again
                str(getattr(self._kernel_provider(), "fingerprint", "")),
                str(torch.get_num_threads()),
            )
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return root / "sagellm" / "tuning" / f"{kind}-{digest}.json"

    def _measured_once(
        self, kind: str, valid: Callable[[Any], bool], measure: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """The choice kept in the ``kind`` tuning file when it is ``valid``; else
        ``measure()``, kept there for the next start (a file that cannot be written is
        logged, not fatal), so every start on this machine picks the same."""
        path = self._tuning_cache(kind)
        try:
            cached = json.loads(path.read_text())
            if isinstance(cached, dict) and valid(cached):
                return cached
        except (OSError, ValueError):
            pass
        chosen = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(chosen) + "\n")
        except OSError:
            logger.info("could not keep the %s choice in %s", kind, path)
        return chosen

    def _decode_step_seconds(self, rows: int, context: int = 128, repeats: int = 5) -> float:
        """Best seconds of a decode step of ``rows`` rows at ``context`` tokens on scratch
        KV caches (every layer and the head, through the path execute takes)."""
        mc = self.model_config
        bs = 16
        per_seq = -(-(context + 1) // bs)
        num_blocks = rows * per_seq
        caches = [
            (
                torch.zeros(num_blocks, bs, mc.num_kv_heads, mc.head_dim, dtype=self.dtype),
                torch.zeros(num_blocks, bs, mc.num_kv_heads, mc.head_dim, dtype=self.dtype),
            )
            for _ in range(mc.num_layers)
        ]
        chunks = [
            SequenceChunk(
                f"t{i}", (7 + i,), context, tuple(range(i * per_seq, (i + 1) * per_seq)), True
            )
            for i in range(rows)
        ]
        batch = build_step_batch(
            chunks,
            block_size=bs,
            num_blocks=num_blocks,
            max_model_len=self.max_model_len,
            mask_dtype=self.dtype,
            device=self.device,
            paged_decode=self._has_decode_kernel,
        )
        best = float("inf")
        for _ in range(repeats + 1):  # the first run warms this shape
            t0 = time.perf_counter()
            self.model(batch.token_ids, batch.positions, caches, batch.meta, batch.logit_rows)
            best = min(best, time.perf_counter() - t0)
        return best

    def _measure_dense_rows(self, layers: list[Linear]) -> int:
        """The smallest candidate row count from which whole decode steps are at least as
        fast with ``layers`` switching to their float product there as on their few-row
        kernels, at that count and every larger one (whole steps: every layer's weights
        stream from memory as in serving, which a product timed alone would not show)."""
        saved = [layer.method.dense_min_rows for layer in layers]  # type: ignore[attr-defined]
        provider = self._kernel_provider()
        step = None
        if provider is not None and "decode_step" in provider.available_ops():
            step = provider.get("decode_step")

        def timed(rows: int, dense: bool) -> float:
            for layer in layers:
                layer.method.dense_min_rows = rows if dense else rows + 1  # type: ignore[attr-defined]
            if step is not None:
                self.model.use_decode_step(step)  # it reads the thresholds when built
            return self._decode_step_seconds(rows)

        cands = self.DENSE_ROW_CANDIDATES
        try:
            with torch.inference_mode():
                faster = [timed(r, True) <= timed(r, False) for r in cands]
        finally:
            for layer, rows in zip(layers, saved):
                layer.method.dense_min_rows = rows  # type: ignore[attr-defined]
        choice = cands[-1]
        for i in range(len(cands) - 1, -1, -1):
            if not faster[i]:
                break
            choice = cands[i]
        return choice

    def _tune_dense_rows(self) -> dict[str, int]:
        """Set the row count from which the quantized projections switch to their float
        product to what this machine measures on whole decode steps (kept in a cache file
        per machine, model, dtype and threads, so every start picks the same and numbers
        stay reproducible); nothing when the user fixed ``dense_min_rows`` or turned
        tuning off. The chosen count (``{"rows": n}``)."""
        if (
            not self.config.tune_dense_rows
            or "dense_min_rows" in self.config.quantization_options
            or self.tp_size > 1  # a rank's timing would run collectives the others do not
        ):
            return {}
        layers = [layer for group in self._switching_layers().values() for layer in group]
        if not layers:
            return {}
        chosen = self._measured_once(
            "dense-rows",
            lambda c: set(c) == {"rows"} and isinstance(c["rows"], int),
            lambda: {"rows": self._measure_dense_rows(layers)},
        )
        rows = int(chosen["rows"])
        for layer in layers:
            layer.method.dense_min_rows = rows  # type: ignore[attr-defined]
        provider = self._kernel_provider()
        if provider is not None and "decode_step" in provider.available_ops():
            self.model.use_decode_step(provider.get("decode_step"))  # it reads the thresholds
        logger.info("quantized projections switch to their float product from %d rows", rows)
        return {"rows": rows}

    # ------------------------------------------------------------------ prefill attention

    def _attention_modules(self) -> list[Attention]:
        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def _prefill_attention_seconds(self, tokens: int = 256, repeats: int = 7) -> dict[str, float]:
        """Median seconds of one layer's causal attention over a fresh ``tokens``-token
        chunk through the kernel provider's prefill kernel and through SDPA, A B
        interleaved, on the path :class:`Attention` takes (the model's head shape)."""
        mc = self.model_config
        (attn, *_) = self._attention_modules()
        kernel = attn.prefill_kernel
        probe = Attention(mc.num_heads, mc.num_kv_heads, mc.head_dim)
        gen = torch.Generator().manual_seed(0)

        def rand(heads: int) -> torch.Tensor:
            x = torch.randn(tokens, heads, mc.head_dim, generator=gen)
            return x.to(self.dtype)

        q, k, v = rand(mc.num_heads), rand(mc.num_kv_heads), rand(mc.num_kv_heads)
        cache = torch.zeros(1, 16, mc.num_kv_heads, mc.head_dim, dtype=self.dtype)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(0, dtype=torch.long),
            chunks=[ChunkMetadata(0, tokens, None, tokens, None)],
        )
        times: dict[str, list[float]] = {"kernel": [], "sdpa": []}
        with torch.inference_mode():
            for i in range(repeats + 1):  # the first pass warms both
                for name, fn in (("kernel", kernel), ("sdpa", None)):
                    probe.prefill_kernel = fn
                    t0 = time.perf_counter()
                    probe(q, k, v, cache, cache, meta, kv_written=True)
                    if i:
                        times[name].append(time.perf_counter() - t0)
        return {name: statistics.median(ts) for name, ts in times.items()}

    def _tune_prefill_attention(self) -> str:
        """Keep the kernel provider's prefill attention only where it beats SDPA on this
        machine: measured once on the model's head shape and kept in a cache file (as the
        dense threshold is), since which wins depends on the CPU (a flash kernel on
        AVX512-BF16 dot products wins on CPUs without AMX; torch's SDPA, whose CPU flash
        attention runs oneDNN's AMX micro-kernels, wins 2-3x where AMX is). What prefill
        chunks attend with: ``"kernel"``, ``"sdpa"``, or ``""`` when no kernel is
        installed (SDPA) or tuning is off (the kernel)."""
        modules = self._attention_modules()
        if not modules or modules[0].prefill_kernel is None:
            return ""
        if not self.config.tune_prefill_attention:
            return "kernel"

        def measure() -> dict[str, Any]:
            secs = self._prefill_attention_seconds()
            logger.info(
                "prefill attention: kernel %.2f ms, SDPA %.2f ms per layer (256 tokens)",
                1e3 * secs["kernel"],
                1e3 * secs["sdpa"],
            )
            return {"use": "kernel" if secs["kernel"] <= secs["sdpa"] else "sdpa"}

        kept = self._measured_once(
            "prefill-attention", lambda c: c.get("use") in ("kernel", "sdpa"), measure
        )
        choice = str(kept["use"])
        if choice == "sdpa":
            for module in modules:
                module.prefill_kernel = None
        logger.info(
            "prefill chunks attend through %s", "SDPA" if choice == "sdpa" else "the kernel"
        )
        return choice

    # ------------------------------------------------------------------ skipped layers

    def _set_layers(self, skip: Sequence[int]) -> None:
        n = len(self._all_layers)
        bad = sorted({i for i in skip if not 0 <= i < n})
        if bad:
            raise ConfigError(f"skip_layers {bad} are not layers of this model (0..{n - 1})")
        skipped = tuple(sorted(set(skip)))
        if len(skipped) >= n:
            raise ConfigError(f"skip_layers leaves none of the model's {n} layers")
        kept = [layer for i, layer in enumerate(self._all_layers) if i not in skipped]
        self.model.layers = torch.nn.ModuleList(kept)
        self.model_config = dataclasses.replace(self._full_config, num_layers=len(kept))
        self.model.config = self.model_config
        self.skip_layers = skipped

    def set_skip_layers(self, skip: Sequence[int]) -> None:
        """Leave the layers ``skip`` out from now on (any set, the earlier ones back in):
        for a calibration that tries many sets on one loaded model. The KV schema changes
        with the number of layers, so the pool is unbound: bind one built from
        :meth:`kv_cache_schema`. Raises ConfigError for an index outside the model, or
        when a sparsifier shrank the layers (its per-block shapes are by index)."""
        if self.sparsity != "none":
            raise ConfigError("set_skip_layers cannot follow a sparsifier; give skip_layers")
        if self.tp_size > 1:
            raise ConfigError("set_skip_layers is not supported with tensor parallelism")
        if self.config.skip_layers:
            raise ConfigError(
                "set_skip_layers needs a model loaded with every layer (skip_layers=()): "
                "layers skipped at load were not quantized"
            )
        self._set_layers(skip)
        provider = self._kernel_provider()
        if provider is not None and "decode_step" in provider.available_ops():
            self.model.use_decode_step(provider.get("decode_step"))
        self._pool = None
        self._caches = []

    def drop_skipped_layers(self) -> None:
        """Free the weights of the layers left out (:meth:`set_skip_layers` cannot bring
        them back afterwards)."""
        self._all_layers = list(self.model.layers)
        self._full_config = self.model_config
        _release_freed_memory()

    # ------------------------------------------------------------------ sparsity

    def _sparsify(self, progress: Callable[[str, int, int], None] | None) -> str:
        """Prune the projections with the configured sparsifier (before quantization, so
        a pruned model can then be quantized); its name, or "none"."""
        spec = self.config.sparsity
        if spec is None or spec.strip() in ("", "none"):
            return "none"
        try:
            name, options = parse_spec(spec)
        except ValueError as exc:
            raise ConfigError(f"sparsity {spec!r}: {exc}") from exc
        options = {**options, **self.config.sparsity_options}
        sparsifier = registry.load(
            "sparsity",
            name,
            options,
            tokenize=self.tokenize,
            head_dim=self.model_config.head_dim,
        )
        if not isinstance(sparsifier, Sparsifier):
            raise CapabilityMismatchError(
                f"sparsifier {name!r} ({type(sparsifier).__name__}) does not implement "
                "sagellm.core.protocols.Sparsifier"
            )
        before = _block_weights(self.model.projections())
        self.block_shapes = apply_sparsifier(
            self.model, sparsifier, lambda ids: self.run_sequence(ids, last_only=True)
        )
        self.pruned_fraction = 1.0 - _block_weights(self.model.projections()) / before
        if progress is not None:
            progress("sparsify", 1, 1)
        return spec

    # ------------------------------------------------------------------ quantization

    def _quantization_name(self, layers: dict[str, Linear]) -> str:
        name = self.config.quantization
        if name is not None:
            return name
        stored_quantized = any(layer.packed is not None for layer in layers.values())
        if stored_quantized and any(p.name == "gguf" for p in registry.available("quantization")):
            return "gguf"
        return "none"

    def _quantize(self, progress: Callable[[str, int, int], None] | None) -> str:
        """Give every projection the configured quantizer's method; the quantizer's name."""
        layers = self.model.projections()
        name = self._quantization_name(layers)
        if name != "none":
            quantizer = registry.load(
                "quantization", name, self.config.quantization_options, tokenize=self.tokenize
            )
            if not isinstance(quantizer, Quantizer):
                raise CapabilityMismatchError(
                    f"quantizer {name!r} ({type(quantizer).__name__}) does not implement "
                    "sagellm.core.protocols.Quantizer"
                )
            self._give_block_methods(layers)
            try:
                quantizer.prepare(layers, self.run_sequence)
                for i, (layer_name, layer) in enumerate(layers.items()):
                    method = quantizer.linear_method(layer_name, layer)
                    if method is not None:
                        layer.set_method(method)
                    if progress is not None:
                        progress("quantize", i + 1, len(layers))
            except ValueError as exc:
                raise ConfigError(f"quantization {name!r}: {exc}") from exc
        for layer in layers.values():
            layer.packed = None  # the checkpoint's blocks are not needed any more
        return name

    def _kernel_provider_name(self) -> str:
        if self.config.kernels is not None:
            return parse_spec(self.config.kernels)[0]
        if self.device.type == "cpu" and any(
            p.name == "fused" for p in registry.available("kernels")
        ):
            return "fused"
        return "eager"

    def _kernel_provider(self) -> KernelProvider | None:
        """The configured kernel provider (loaded once); None for eager."""
        if not hasattr(self, "_provider"):
            name = self._kernel_provider_name()
            provider = None
            if name != "eager":
                options = dict(self.config.kernel_options)
                if self.config.kernels is not None:
                    options.update(parse_spec(self.config.kernels)[1])
                provider = registry.load("kernels", name, options)
                if not isinstance(provider, KernelProvider):
                    raise CapabilityMismatchError(
                        f"kernel provider {name!r} ({type(provider).__name__}) does not "
                        "implement sagellm.core.protocols.KernelProvider"
                    )
            self._provider: KernelProvider | None = provider
        return self._provider

    def _give_block_methods(self, layers: dict[str, Linear]) -> None:
        """Offer each projection that carries checkpoint blocks the kernel provider's
        method on those blocks (``layer.block_method``); a quantizer that computes on
        the blocks as stored (``gguf``) uses it for its few-row steps."""
        provider = self._kernel_provider()
        if provider is None or "gguf_linear" not in provider.available_ops():
            return
        make = provider.get("gguf_linear")
        for layer in layers.values():
            if layer.packed is not None:
                layer.block_method = make(layer.packed.format)

    def _use_kernels(self) -> str:
        """Hand the projections to the configured kernel provider's ops; its name."""
        name = self._kernel_provider_name()
        provider = self._kernel_provider()
        if provider is None:
            return name
        ops = set(provider.available_ops())
        if "fused_layer_ops" in ops:
            self.model.use_kernels(provider.get("fused_layer_ops"))
        if "paged_decode_attention" in ops:
            kernel = provider.get("paged_decode_attention")
            for module in self.model.modules():
                if isinstance(module, Attention):
                    module.decode_kernel = kernel
            self._has_decode_kernel = True
        if "prefill_attention" in ops:
            prefill = provider.get("prefill_attention")(self.dtype, self.model_config.head_dim)
            if prefill is None:
                logger.info(
                    "kernels %s: no prefill attention for %s, head_dim %d here; SDPA is used",
                    name,
                    self.dtype,
                    self.model_config.head_dim,
                )
            else:
                for module in self.model.modules():
                    if isinstance(module, Attention):
                        module.prefill_kernel = prefill
        # the many-row steps of a quantized projection run W8A8 where the provider has
        # it (the weights are quantized already); a float model stays float
        make_int8 = provider.get("int8_dense_linear") if "int8_dense_linear" in ops else None
        if "dense_linear" in ops:
            make = provider.get("dense_linear")
            for layer_name, layer in self.model.projections().items():
                # the tied head's weight is the embedding table: a blocked copy would
                # double it for the rare step that samples many rows
                tied = layer_name == "lm_head" and self.model_config.tie_word_embeddings
                if layer.weight is None or tied:
                    continue
                quantized = layer.method is not layer.dense
                method = make_int8(self.dtype) if quantized and make_int8 else None
                method = method or make(self.dtype)
                if method is None:
                    logger.info("kernels %s: no dense linear for %s here", name, self.dtype)
                    break
                layer.set_dense(method)
        self._embed_from_head_blocks(
            make_int8 or (provider.get("dense_linear") if "dense_linear" in ops else None)
        )
        if "decode_step" in ops and self.model.use_decode_step(provider.get("decode_step")):
            logger.info(
                "kernels %s: decode steps of up to %d rows run every layer in one call",
                name,
                self.model.decode_step_rows - 1,
            )
        return name

    def _embed_from_head_blocks(
        self, make_dense: Callable[[torch.dtype], LinearMethod | None] | None = None
    ) -> None:
        """A tied head computing on Q8_0 blocks serves the embedding lookups from them
        too: the float table (the largest tensor of a small model) is dropped, or, given
        a kernel provider's dense linear, becomes the head's blocked float (or W8A8 int8)
        copy for steps of many rows (a 64-row decode step: 47 -> 10 ms for the embedded model's head in
        bf16 here, where the block kernel's few-row passes lose to a matrix product)."""
        head, embed = self.model.lm_head, self.model.embed_tokens
        codes = getattr(head, "block_codes", None)
        if (
            not self.model_config.tie_word_embeddings
            or codes is None
            or codes.dtype != torch.int8
            or embed.weight is None
            or head.weight is not embed.weight
        ):
            return
        embed.use_blocks(codes, cast(torch.Tensor, head.block_scales), self.dtype)
        dense = make_dense(self.dtype) if make_dense is not None else None
        if dense is not None:
            head.set_dense(dense)  # reorders the table into its copy and drops it
        else:
            head.register_parameter("weight", None)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` by the model's own tokenizer (loaded on first use; for
        calibrating quantizers and evaluation)."""
        if self._tokenizer is None:
            from sagellm.engine.models.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.source)
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids

    def run_sequence(self, token_ids: Sequence[int], *, last_only: bool = False) -> torch.Tensor:
        """Float32 logits of every position of one sequence, on a scratch KV cache.

        For calibration and evaluation: nothing touches the bound pool. ``last_only``:
        only the last position's logits (calibration hooks need the layers, not the
        head's ``[n, vocab]`` product).
        """
        n = len(token_ids)
        if not 0 < n <= self.max_model_len:
            raise ValueError(f"a sequence of {n} tokens does not fit 1..{self.max_model_len}")
        if self.tp_size > 1 and self._loaded:
            # every rank must run the same collectives: only the load (where each rank
            # calibrates alike) may run sequences outside the plans rank 0 sends
            raise CapabilityMismatchError(
                "run_sequence on a tensor-parallel runtime after loading: the other ranks "
                "would not join its collectives; evaluate with tensor_parallel_size=1"
            )
        mc = self.model_config
        bs = 16
        num_blocks = -(-n // bs)
        caches = [
            (
                torch.zeros(num_blocks, bs, mc.num_kv_heads, mc.head_dim, dtype=self.dtype),
                torch.zeros(num_blocks, bs, mc.num_kv_heads, mc.head_dim, dtype=self.dtype),
            )
            for _ in range(mc.num_layers)
        ]
        chunk = SequenceChunk(
            "run", tuple(int(t) for t in token_ids), 0, tuple(range(num_blocks)), True
        )
        batch = build_step_batch(
            [chunk],
            block_size=bs,
            num_blocks=num_blocks,
            max_model_len=self.max_model_len,
            mask_dtype=self.dtype,
            device=self.device,
        )
        rows = torch.arange(n - 1 if last_only else 0, n, device=self.device)
        return self.model(batch.token_ids, batch.positions, caches, batch.meta, rows).cpu()

    # ------------------------------------------------------------------ protocol

    def capabilities(self) -> CapabilityDescriptor:
        """Devices, dtypes and the longest sequence the loaded model supports."""
        return CapabilityDescriptor(
            name=f"native:{self.source.name}",
            devices=("cpu", "cuda"),
            dtypes=("float32", "bfloat16"),
            kv_dtypes=tuple(sorted(KV_DTYPES)),  # type: ignore[arg-type]
            kv_schema=self.kv_cache_schema(16),
            max_model_len=self.model_config.max_position_embeddings,
            features=("paged_attention", "chunked_prefill", "prefix_caching", "mixed_batch"),
        )

    def kv_cache_schema(self, block_size: int, dtype: str | None = None) -> KVCacheSchema:
        """The KV layout this model needs at ``block_size`` tokens per block.

        ``dtype``: a KV element type (``"bfloat16"``, ``"int8"``, ``"float8_e4m3fn"``, ...)
        or a ``kv_cache_dtype`` choice (``"auto"``, ``"fp8_e4m3"``, ...); None: the
        configured ``kv_cache_dtype``. A quantized type gets 2 scale bytes per row.
        """
        choice = dtype or self.config.kv_cache_dtype
        name = KV_CACHE_DTYPES.get(choice, choice)
        if name == "auto":
            name = str(self.dtype).removeprefix("torch.")
        if name not in _KV_DTYPES | _QUANTIZED_KV_DTYPES:
            raise ConfigError(
                f"KV cache dtype {choice!r} is not supported by the native runtime; use one "
                f"of {', '.join(sorted(_KV_DTYPES | _QUANTIZED_KV_DTYPES))} (or a "
                f"kv_cache_dtype choice: auto, {', '.join(KV_CACHE_DTYPES)})"
            )
        return kv_schema_of(self.model_config, block_size, name)

    def bind_kv_pool(self, pool: KVPool) -> None:
        """Use ``pool``'s storage for attention; CapabilityMismatchError if it cannot fit."""
        s = pool.schema
        mc = self.model_config
        want = (mc.num_layers, mc.num_kv_heads, mc.head_dim)
        got = (s.num_layers, s.num_kv_heads, s.head_dim)
        if got != want:
            raise CapabilityMismatchError(
                f"KV pool schema has (layers, kv_heads, head_dim)={got} but model "
                f"{self.source.name!r} needs {want}; build the pool from "
                "runtime.kv_cache_schema(block_size)"
            )
        if s.dtype not in _KV_DTYPES | _QUANTIZED_KV_DTYPES:
            raise CapabilityMismatchError(
                f"KV pool dtype {s.dtype!r} is not one the native runtime reads; use one of "
                f"{', '.join(sorted(_KV_DTYPES | _QUANTIZED_KV_DTYPES))}"
            )
        scale_bytes = _KV_SCALE_BYTES if s.dtype in _QUANTIZED_KV_DTYPES else 0
        if s.scale_bytes != scale_bytes:
            raise CapabilityMismatchError(
                f"KV pool schema of dtype {s.dtype!r} has scale_bytes={s.scale_bytes}; the "
                f"native runtime reads {scale_bytes} (a float16 scale per token-head row of "
                "a quantized cache); build the pool from runtime.kv_cache_schema(block_size)"
            )
        caches = [pool.layer_cache(i) for i in range(mc.num_layers)]
        if caches[0][0].device != self.device:
            raise CapabilityMismatchError(
                f"KV pool storage is on {caches[0][0].device} but the model is on "
                f"{self.device}; build the pool with device={str(self.device)!r}"
            )
        self._pool = pool
        self._caches = caches
        self._paged_decode = self._has_decode_kernel and s.dtype in _PAGED_DECODE_KV_DTYPES
        if self._tp is not None:  # the workers' storage: same block ids, their KV heads
            self._tp.send(("bind", s, pool.num_blocks))

    def execute(
        self,
        plan: ExecutionPlan,
        *,
        hidden_ids: Collection[str] = (),
        prompt_logit_ids: Collection[str] = (),
    ) -> ModelOutput:
        """Run the plan's compute nodes; fp32 logits of every sampled chunk, in plan order.

        KV migrations and transfers are not run here (the engine runs them first).
        ``hidden_ids`` / ``prompt_logit_ids``: requests whose chunks also return the
        final-norm hidden states / the logits of every position (embeddings, prompt
        logprobs); the result is then a :class:`RowOutput`. With tensor parallelism every
        rank runs the plan (rank 0 sends it first); a rank that is gone or fails raises
        :class:`~sagellm.engine.runtime.tensor_parallel.TensorParallelError`.
        """
        if self._tp is None:
            return self.execute_local(
                plan, hidden_ids=hidden_ids, prompt_logit_ids=prompt_logit_ids
            )
        self._tp.send(("execute", plan, tuple(hidden_ids), tuple(prompt_logit_ids)))
        try:
            return self.execute_local(
                plan, hidden_ids=hidden_ids, prompt_logit_ids=prompt_logit_ids
            )
        except Exception as exc:
            self._tp.check()  # a worker that died: say which
            self._tp.fail(f"a tensor-parallel step failed ({type(exc).__name__}: {exc})")
            raise TensorParallelError(f"{self._tp.broken}; restart the engine") from exc

    def execute_local(
        self,
        plan: ExecutionPlan,
        *,
        hidden_ids: Collection[str] = (),
        prompt_logit_ids: Collection[str] = (),
    ) -> ModelOutput:
        """:meth:`execute` on this rank only (tensor-parallel workers call it)."""
        if hidden_ids or prompt_logit_ids:
            return self._execute_rows(plan, set(hidden_ids), set(prompt_logit_ids))
        vocab = self.model_config.vocab_size
        batch = self._step_batch(plan)
        if batch is None:
            return ModelOutput((), torch.empty(0, vocab, dtype=torch.float32))
        ids = batch.token_ids
        if batch.logit_rows.numel() == 0:
            self.model(ids, batch.positions, self._caches, batch.meta, batch.logit_rows)
            return ModelOutput((), torch.empty(0, vocab, dtype=torch.float32))
        logits = self.model(ids, batch.positions, self._caches, batch.meta, batch.logit_rows)
        if logits.device.type != "cpu":
            logits = logits.cpu()
        return ModelOutput(batch.request_ids, logits)

    def _step_batch(self, plan: ExecutionPlan) -> StepBatch | None:
        """The flattened batch of the plan's compute chunks (None when there are none),
        its token ids checked against the vocabulary."""
        if self._pool is None:
            raise SageLLMError("NativeRuntime.execute before bind_kv_pool(pool)")
        chunks = plan.compute_chunks
        if not chunks:
            return None
        batch = build_step_batch(
            chunks,
            block_size=self._pool.schema.block_size,
            num_blocks=self._pool.num_blocks,
            max_model_len=self.max_model_len,
            mask_dtype=self.dtype,
            device=self.device,
            paged_decode=self._paged_decode,
        )
        ids = batch.token_ids
        vocab = self.model_config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            bad = ids[(ids < 0) | (ids >= vocab)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary 0..{vocab - 1}")
        return batch

    # ------------------------------------------------------------------ every row of a chunk

    def _execute_rows(
        self, plan: ExecutionPlan, hidden_ids: set[str], prompt_logit_ids: set[str]
    ) -> RowOutput:
        """:meth:`execute` that also returns every row of the named requests' chunks.

        One forward pass: the final-norm hidden states of the sampled rows and of the
        extra rows are taken together; the head runs on the sampled rows and on the rows
        of ``prompt_logit_ids``.
        """
        batch = self._step_batch(plan)
        if batch is None:
            vocab = self.model_config.vocab_size
            return RowOutput((), torch.empty(0, vocab, dtype=torch.float32))
        ids = batch.token_ids
        chunks = plan.compute_chunks
        chunk_rows = _chunk_rows(chunks)
        wanted = [rid for rid in chunk_rows if rid in hidden_ids or rid in prompt_logit_ids]
        extra = [r for rid in wanted for r in chunk_rows[rid]]
        num_sampled = batch.logit_rows.numel()
        rows = torch.cat(
            [batch.logit_rows, torch.tensor(extra, dtype=torch.long, device=self.device)]
        )
        x = self.model(ids, batch.positions, self._caches, batch.meta, rows, head=False)
        logits = self.model.lm_head(x[:num_sampled]).cpu()
        hidden: dict[str, torch.Tensor] = {}
        prompt_logits: dict[str, torch.Tensor] = {}
        offset = num_sampled
        for rid in wanted:
            n = len(chunk_rows[rid])
            part = x[offset : offset + n]
            offset += n
            if rid in hidden_ids:
                hidden[rid] = part.float().cpu()
            if rid in prompt_logit_ids:
                prompt_logits[rid] = self.model.lm_head(part).cpu()
        return RowOutput(batch.request_ids, logits, hidden, prompt_logits)
