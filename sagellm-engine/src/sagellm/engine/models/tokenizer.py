"""The tokenizer of a model source, built offline, with its chat template and special ids.

A safetensors folder carries ``tokenizer.json`` / ``tokenizer_config.json``: transformers
reads them. A GGUF file carries the vocabulary, merges and template as metadata: for
byte-level BPE vocabularies (``tokenizer.ggml.model = gpt2``: SmolLM, Llama 3, Qwen2) the
``tokenizers`` BPE is assembled here directly, with the pre-tokenizer of the file's
``tokenizer.ggml.pre`` (a fraction of a second); other vocabularies go through
transformers' GGUF conversion.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagellm.core.errors import ModelNotFoundError
from sagellm.engine.models.source import ModelSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["gguf_tokenizer", "load_tokenizer"]

# split patterns of llama.cpp's pre-tokenizer types (applied before byte-level mapping)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# pre type -> (split digits one by one first, split pattern)
_PRE: dict[str, tuple[bool, str]] = {
    "default": (False, _GPT2_SPLIT),
    "gpt2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "smaug-bpe": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
    "deepseek-r1-qwen": (False, _QWEN2_SPLIT),
}
_CONTROL = 3  # llama.cpp token type of special tokens
_USER_DEFINED = 4


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer of ``source`` (offline); ``chat_template``, bos/eos/pad are set."""
    if source.kind == "gguf":
        from sagellm.engine.models.gguf_file import GGUFFile

        return gguf_tokenizer(GGUFFile(source.path).metadata, source)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"no usable tokenizer in {source.path}: add tokenizer.json and "
            f"tokenizer_config.json ({exc})"
        ) from exc
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def gguf_tokenizer(meta: dict[str, Any], source: ModelSource) -> PreTrainedTokenizerBase:
    """A fast tokenizer from GGUF tokenizer metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        return _transformers_gguf(source)
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tk = Tokenizer(bpe)
    digits, split = _PRE.get(str(meta.get("tokenizer.ggml.pre", "default")), _PRE["default"])
    steps: list[Any] = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _USER_DEFINED
    ]
    tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)

    def tok_of(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    eos = tok_of("tokenizer.ggml.eos_token_id")
    pad = tok_of("tokenizer.ggml.padding_token_id") or eos
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=tok_of("tokenizer.ggml.bos_token_id"),
        eos_token=eos,
        unk_token=tok_of("tokenizer.ggml.unknown_token_id"),
        pad_token=pad,
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get(f"{meta.get('general.architecture')}.context_length", 8192)),
    )
    template = meta.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    # GGUF says whether encode() prepends bos; the PreTrainedTokenizerFast above never does,
    # so a file that wants bos gets a post-processor that adds it
    if meta.get("tokenizer.ggml.add_bos_token") and fast.bos_token is not None:
        from tokenizers import processors

        bos = fast.bos_token
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, fast.bos_token_id)]
        )
    return fast


def _transformers_gguf(source: ModelSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(source.path.parent), gguf_file=source.path.name, local_files_only=True
    )
