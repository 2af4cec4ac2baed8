"""GGUF vocabulary -> Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, ...).

This module owns rebuilding a ``tokenizers`` library tokenizer from a GGUF file's
``tokenizer.ggml.*`` metadata, the way the model's original Hugging Face ``tokenizer.json``
(and llama.cpp's llama-vocab.cpp) tokenize:

* ``gpt2``: byte-level BPE from the stored tokens and merges.  The pre-tokenizer (text split,
  normalizer, merge rule) is picked by ``tokenizer.ggml.pre`` from the table in
  :mod:`server.models.gguf_pretokenizers`; a name not in it is refused, never guessed.
* ``llama``: SentencePiece-style BPE with byte fallback (merges from the file, or derived from the
  token scores), the legacy ``"▁"`` prefix normalizer llama.cpp also uses.
* ``gemma4``: the same BPE over raw UTF-8 with ``"▁"`` for spaces, from the stored merges, without
  a space prefix (Gemma 4).

Any other ``tokenizer.ggml.model`` (``bert`` WordPiece, ``t5`` Unigram, ...) is refused.

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens,
so that chat markers like ``<|im_start|>`` encode as one id.  It is called by
:func:`server.models.gguf.convert_gguf`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from server.models.gguf_metadata import GGUFConversionError, meta_value
from server.models.gguf_pretokenizers import LLAMA3_NAMES, byte_level_split

log = logging.getLogger(__name__)

__all__ = ["build_tokenizer", "tokenizer_config", "write_tokenizer_files"]

# llama-vocab.cpp token types.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_MODELS = ("gpt2", "llama", "gemma4")  # tokenizer.ggml.model values built here


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
    pre = meta_value(meta, "tokenizer.ggml.pre") or "default"
    default = meta_value(meta, "tokenizer.ggml.model") in ("llama", "gemma4") or pre in LLAMA3_NAMES
    return _flag(meta, "tokenizer.ggml.add_bos_token", default)


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if vocab.setdefault(token, index) != index:
            log.warning("GGUF vocabulary repeats token %r (ids %d, %d); keeping the first", token, vocab[token], index)
    return vocab


def _merges(meta: dict[str, Any]) -> list[tuple[str, str]] | None:
    """The stored merges; llama.cpp splits each at the first space after its first byte."""
    stored = meta_value(meta, "tokenizer.ggml.merges")
    if not stored:
        return None
    pairs = []
    for merge in stored:
        cut = merge.find(" ", 1)
        pairs.append((merge[:cut], merge[cut + 1 :]) if cut > 0 else (merge, ""))
    return pairs


def _byte_level_bpe(meta: dict[str, Any], vocab: dict[str, int]) -> Tokenizer:
    """``gpt2``: byte-level BPE split the way ``tokenizer.ggml.pre`` names."""
    pre_tokenizer, normalizer, ignore_merges = byte_level_split(meta_value(meta, "tokenizer.ggml.pre") or "default")
    tokenizer = Tokenizer(models.BPE(vocab, _merges(meta) or [], ignore_merges=ignore_merges))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], vocab: dict[str, int], kind: str) -> Tokenizer:
    """``llama`` and ``gemma4``: BPE over raw UTF-8 with ``"▁"`` for spaces and byte fallback.

    ``llama`` files (SentencePiece) may carry no merges: they are derived from the scores.
    ``gemma4`` files carry merges and no space prefix; llama.cpp's only pre-split (at newlines)
    changes nothing, as no merge joins a newline to anything else.
    """
    merges = _merges(meta)
    if merges is None:
        if kind == "gemma4":
            raise GGUFConversionError("GGUF tokenizer model 'gemma4' without tokenizer.ggml.merges")
        scores = meta_value(meta, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = _spm_merges(tokens, scores)
    unk_id = meta_value(meta, "tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps: list[Any] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    replace = normalizers.Replace(" ", "▁")
    if _flag(meta, "tokenizer.ggml.add_space_prefix", kind == "llama"):
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tokenizer.normalizer = replace
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's vocabulary (see the module docstring).

    Raises GGUFConversionError for a tokenizer model or pre-tokenizer it cannot reproduce exactly.
    """
    kind = meta_value(meta, "tokenizer.ggml.model")
    tokens: list[str] | None = meta_value(meta, "tokenizer.ggml.tokens")
    if kind not in _MODELS or not tokens:
        raise GGUFConversionError(
            f"unsupported GGUF tokenizer model {kind!r} (tokenizer.ggml.model); supported: {', '.join(_MODELS)}"
        )
    types = meta_value(meta, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = _vocab(tokens)
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, vocab)
    else:
        tokenizer = _sentencepiece_bpe(meta, tokens, vocab, kind)
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
