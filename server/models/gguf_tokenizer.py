"""GGUF vocabulary -> Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, ...).

This module owns rebuilding a ``tokenizers`` library tokenizer from a GGUF file's
``tokenizer.ggml.*`` metadata, the way the model's original Hugging Face ``tokenizer.json``
(and llama.cpp's llama-vocab.cpp) tokenize:

* ``gpt2``: byte-level BPE from the stored tokens and merges.  The pre-tokenizer is picked by
  ``tokenizer.ggml.pre`` (``smollm``/``starcoder``/``refact``: single digits then GPT-2 byte-level;
  ``llama-bpe``: the Llama 3 split; ``qwen2``: the Qwen2 split with NFC; ``gpt-2``/``default``:
  GPT-2).  Unknown names fall back to GPT-2 with a warning.
* ``llama``: SentencePiece-style BPE with byte fallback (merges from the file, or derived from the
  token scores), the legacy ``"▁"`` prefix normalizer llama.cpp also uses.

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens,
so that chat markers like ``<|im_start|>`` encode as one id.  It is called by
:func:`server.models.gguf.convert_gguf`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from server.models.gguf_metadata import GGUFConversionError, meta_value

log = logging.getLogger(__name__)

__all__ = ["build_tokenizer", "tokenizer_config", "write_tokenizer_files"]

# llama-vocab.cpp token types.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_KINDS = {
    **dict.fromkeys(("default", "gpt2", "gpt-2"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact"), "digits"),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), "qwen2"),
}


def _byte_level_pre_tokenizer(pre: str) -> tuple[Any, normalizers.Normalizer | None, bool]:
    """(pre-tokenizer, normalizer, ignore_merges) for a ``tokenizer.ggml.pre`` name."""
    kind = _PRE_KINDS.get(pre)
    if kind is None:
        log.warning("unknown GGUF pre-tokenizer %r; falling back to GPT-2 byte-level splitting", pre)
        kind = "gpt2"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt2", "digits"))
    if kind == "gpt2":
        return byte_level, None, False
    if kind == "digits":  # Hugging Face SmolLM2 / StarCoder: Digits(individual) then ByteLevel
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), None, False
    split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if kind == "llama3" else _QWEN2_SPLIT), behavior="isolated")
    if kind == "llama3":
        return pre_tokenizers.Sequence([split, byte_level]), None, True
    return pre_tokenizers.Sequence([split, byte_level]), normalizers.NFC(), False


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by the vocabulary: a merge ranks by its result's score."""
    ids = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, int, int, int, str, str]] = []
    for index, (token, score) in enumerate(zip(tokens, scores)):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                found.append((-score, -len(left), -len(right), index, ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def _flag(meta: dict[str, Any], key: str, default: bool) -> bool:
    value = meta_value(meta, key)
    return default if value is None else bool(value)


def _add_bos(meta: dict[str, Any]) -> bool:
    """The file's flag, else llama.cpp's default: on for SentencePiece and the Llama 3 BPE vocabulary."""
    pre = _PRE_KINDS.get(meta_value(meta, "tokenizer.ggml.pre") or "default")
    default = meta_value(meta, "tokenizer.ggml.model") == "llama" or pre == "llama3"
    return _flag(meta, "tokenizer.ggml.add_bos_token", default)


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's vocabulary (see the module docstring)."""
    kind = meta_value(meta, "tokenizer.ggml.model")
    tokens: list[str] | None = meta_value(meta, "tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama") or not tokens:
        raise GGUFConversionError(f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2, llama")
    types = meta_value(meta, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if vocab.setdefault(token, index) != index:
            log.warning("GGUF vocabulary repeats token %r (ids %d, %d); keeping the first", token, vocab[token], index)
    stored = meta_value(meta, "tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in stored] if stored else None

    if kind == "gpt2":
        pre_tokenizer, normalizer, ignore_merges = _byte_level_pre_tokenizer(
            meta_value(meta, "tokenizer.ggml.pre") or "default"
        )
        tokenizer = Tokenizer(models.BPE(vocab, merges or [], ignore_merges=ignore_merges))
        tokenizer.normalizer = normalizer
        tokenizer.pre_tokenizer = pre_tokenizer
        tokenizer.decoder = decoders.ByteLevel()
    else:
        if merges is None:
            scores = meta_value(meta, "tokenizer.ggml.scores") or [0.0] * len(tokens)
            merges = _spm_merges(tokens, scores)
        unk_id = meta_value(meta, "tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None else None
        tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        steps: list[Any] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        replace = normalizers.Replace(" ", "▁")
        if _flag(meta, "tokenizer.ggml.add_space_prefix", True):
            tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace])
            steps.append(decoders.Strip(" ", 1, 0))
        else:
            tokenizer.normalizer = replace
        tokenizer.decoder = decoders.Sequence(steps)

    special = [t for t, k in zip(tokens, types) if k in (_UNKNOWN, _CONTROL)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    tokenizer.post_processor = _post_processor(meta, tokens, kind)
    return tokenizer


def _token(meta: dict[str, Any], tokens: list[str], key: str) -> str | None:
    index = meta_value(meta, f"tokenizer.ggml.{key}_token_id")
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def _post_processor(meta: dict[str, Any], tokens: list[str], kind: str) -> Any:
    add_bos = _add_bos(meta)
    add_eos = _flag(meta, "tokenizer.ggml.add_eos_token", False)
    bos, eos = _token(meta, tokens, "bos"), _token(meta, tokens, "eos")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False) if kind == "gpt2" else None
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = single + " " + " ".join([f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    ids = {t: tokens.index(t) for t in (bos, eos) if t is not None}
    special = [(t, ids[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def tokenizer_config(meta: dict[str, Any], *, model_max_length: int | None = None) -> dict[str, Any]:
    """tokenizer_config.json: special tokens, BOS/EOS flags, the chat template."""
    tokens = meta_value(meta, "tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _add_bos(meta),
        "add_eos_token": _flag(meta, "tokenizer.ggml.add_eos_token", False),
        "clean_up_tokenization_spaces": False,
    }
    for name in ("bos", "eos", "unk", "pad"):
        key = "unknown" if name == "unk" else "padding" if name == "pad" else name
        if (token := _token(meta, tokens, key)) is not None:
            config[f"{name}_token"] = token
    if model_max_length:
        config["model_max_length"] = model_max_length
    if template := meta_value(meta, "tokenizer.chat_template"):
        config["chat_template"] = template
    return config


def write_tokenizer_files(
    meta: dict[str, Any], out_dir: Path, *, model_max_length: int | None = None, tokenizer: Tokenizer | None = None
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir.

    ``tokenizer`` is ``build_tokenizer(meta)``, built here when not given.
    """
    (tokenizer or build_tokenizer(meta)).save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(meta, model_max_length=model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    special_map = {k: config[k] for k in names if k in config}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False))
