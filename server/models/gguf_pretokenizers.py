"""``tokenizer.ggml.pre`` -> the byte-level BPE pre-tokenizer, normalizer and merge rule of the original model.

llama.cpp names a BPE vocabulary's text splitting by ``tokenizer.ggml.pre`` (chosen by
convert_hf_to_gguf.py from the Hugging Face tokenizer) and re-implements each split in
llama-vocab.cpp.  This module owns the table that turns such a name back into what the model's
own ``tokenizer.json`` does: its split regexes (each piece kept apart, "isolated"), digit and
punctuation splitting, GPT-2's byte-level split, an NFC normalizer, and ``ignore_merges`` (a
piece that is already a token is not re-merged).  A name that is not in the table is refused
with :class:`GGUFConversionError`: guessing a split tokenizes differently from the model.

The names with a llama.cpp test vocabulary (``ggml-vocab-NAME.gguf`` with ``.inp``/``.out``) are
checked against every vector by tests/test_gguf_vocab_vectors.py; the others are transcriptions of
their models' ``tokenizer.json`` pre-tokenizers (llama.cpp keeps the original regex next to its
adaptation), whose splits that test compares with llama.cpp's own regexes on the same texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import Regex, normalizers, pre_tokenizers

from server.models.gguf_metadata import GGUFConversionError

__all__ = ["LLAMA3_NAMES", "PRE_TOKENIZERS", "ByteLevelSplit", "byte_level_split"]

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_O200K = (  # GPT-4o / gpt-oss (o200k_base), MiniMax-M2
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (  # Mistral NeMo / Small 3.x / Devstral / Ministral
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_LETTERS = (  # deepseek-llm's Latin/Greek/Cyrillic/... letter class, as in its tokenizer.json
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370"
    "-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-"
    "\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-"
    "\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-"
    "\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a"
    "-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-"
    "\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-"
    "\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-"
    "\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-"
    "\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM = (
    r"[\r\n]",
    r"\s?[" + _DEEPSEEK_LETTERS + "]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "digit-runs",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", "digits")
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


@dataclass(frozen=True)
class ByteLevelSplit:
    """One pre-tokenizer of the table.

    ``steps``: regexes (each match kept as its own piece), ``"digits"`` (every digit alone),
    ``"digit-runs"`` (runs of digits), ``"punctuation"`` (runs of punctuation), applied in order;
    ``gpt2_regex``: the final byte-level step also applies GPT-2's split; ``nfc``: NFC first.
    """

    steps: tuple[str, ...] = ()
    gpt2_regex: bool = False
    nfc: bool = False
    ignore_merges: bool = False


_GPT2 = ByteLevelSplit(gpt2_regex=True)
_DIGITS_GPT2 = ByteLevelSplit(("digits",), gpt2_regex=True)
_LLAMA3_SPLIT = ByteLevelSplit((_LLAMA3,), ignore_merges=True)
# The Llama 3 names: llama.cpp adds BOS by default for them (and for SentencePiece vocabularies).
LLAMA3_NAMES = frozenset({"llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "smaug-bpe"})

PRE_TOKENIZERS: dict[str, ByteLevelSplit] = {
    # llama.cpp's "default" is a file written before the name existed; transformers reads it as GPT-2.
    **dict.fromkeys(("default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), _DIGITS_GPT2),
    "command-r": ByteLevelSplit(("digits",), gpt2_regex=True, nfc=True),
    **dict.fromkeys(sorted(LLAMA3_NAMES), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), ByteLevelSplit((_QWEN2,), nfc=True)),
    "qwen35": ByteLevelSplit((_QWEN35,)),  # no NFC: Qwen3.5 keeps combining marks as given
    "deepseek-llm": ByteLevelSplit(_DEEPSEEK_LLM),
    "deepseek-coder": ByteLevelSplit(_DEEPSEEK_CODER),
    "deepseek-v3": ByteLevelSplit(_DEEPSEEK_V3),
    "falcon": ByteLevelSplit(("punctuation",), gpt2_regex=True),  # then 3-digit runs: see byte_level_split
    **dict.fromkeys(("gpt-4o", "minimax-m2"), ByteLevelSplit((_O200K,))),
    "tekken": ByteLevelSplit((_TEKKEN,), ignore_merges=True),
    "glm4": ByteLevelSplit((_LLAMA3,), ignore_merges=True),
}


def _step(step: str) -> Any:
    if step == "digits":
        return pre_tokenizers.Digits(individual_digits=True)
    if step == "digit-runs":
        return pre_tokenizers.Digits(individual_digits=False)
    if step == "punctuation":
        return pre_tokenizers.Punctuation("contiguous")
    return pre_tokenizers.Split(Regex(step), behavior="isolated")


def byte_level_split(pre: str) -> tuple[Any, normalizers.Normalizer | None, bool]:
    """(pre-tokenizer, normalizer or None, ignore_merges) for a ``tokenizer.ggml.pre`` name.

    Raises GGUFConversionError for a name not in :data:`PRE_TOKENIZERS`.
    """
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise GGUFConversionError(
            f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre): its text splitting is not "
            f"reproduced exactly, so the model would be served with wrong token ids; supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    steps = [_step(s) for s in spec.steps]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.gpt2_regex))
    if pre == "falcon":  # Falcon's tokenizer.json: Punctuation, ByteLevel, Digits, then runs of three digits
        steps += [pre_tokenizers.Split(Regex(r"[0-9][0-9][0-9]"), behavior="isolated")]
    pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    return pre_tokenizer, normalizers.NFC() if spec.nfc else None, spec.ignore_merges
