"""The GGUF tokenizer builder against llama.cpp's own tokenizer test vectors.

llama.cpp ships a vocab-only GGUF per tokenizer family (``models/ggml-vocab-NAME.gguf``) with
``.inp`` (texts, each followed by a line ``__ggml_vocab_test__``) and ``.out`` (one line of
space-separated ids per text: what the model's Hugging Face tokenizer gives with
``add_special_tokens=False``).  Every vocabulary we claim must reproduce all of them; the others
must be refused at conversion.  Names of ``tokenizer.ggml.pre`` without a test vocabulary are
checked split for split against llama.cpp's regexes (with the ``regex`` module) on the same texts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.models.gguf_metadata import GGUFConversionError
from server.models.gguf_pretokenizers import PRE_TOKENIZERS, byte_level_split
from server.models.gguf_tokenizer import build_tokenizer
from tests.real_vocab import llama_cpp_file, vocab_metadata

SEPARATOR = "\n__ggml_vocab_test__\n"
# Every test vocabulary with .inp/.out files (all of them reproduced exactly) ...
CLAIMED = [
    "command-r",
    "deepseek-coder",
    "deepseek-llm",
    "falcon",
    "gemma-4",
    "gpt-2",
    "llama-bpe",
    "llama-spm",
    "mpt",
    "phi-3",
    "qwen2",
    "qwen35",
    "refact",
    "starcoder",
]
# ... but this one: WordPiece (tokenizer.ggml.model "bert"), an encoder vocabulary.
REFUSED = {"bert-bge": "tokenizer model 'bert'"}


def _fetch(member: str) -> Path:
    try:
        return llama_cpp_file(member)
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"llama.cpp's test vocabularies (llama-cpp-python sdist) cannot be fetched: {exc}")


def vocab_vectors(name: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs of ``ggml-vocab-NAME.gguf.inp``/``.out``.

    The generator writes ``text + SEPARATOR`` per text; a file whose last separator was lost
    (gemma-4's) still holds its last text, which the ``.out`` file has a line for.
    """
    raw = _fetch(f"models/ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    texts = raw.split(SEPARATOR)
    if texts[-1] == "":
        texts.pop()
    lines = _fetch(f"models/ggml-vocab-{name}.gguf.out").read_text().split("\n")
    if lines[-1] == "":
        lines.pop()
    assert len(texts) == len(lines), name
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


def _metadata(name: str) -> dict[str, Any]:
    _fetch(f"models/ggml-vocab-{name}.gguf")
    return vocab_metadata(name)


def mismatches(tokenizer: Any, vectors: list[tuple[str, list[int]]]) -> list[tuple[str, list[int], list[int]]]:
    found = []
    for text, expected in vectors:
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if got != expected:
            found.append((text, expected, got))
    return found


@pytest.mark.parametrize("name", CLAIMED)
def test_vocabulary_reproduces_every_vector(name: str) -> None:
    """All of llama.cpp's vectors, with the tokenizer as built and as saved to tokenizer.json."""
    from tokenizers import Tokenizer

    vectors = vocab_vectors(name)
    assert len(vectors) >= 45
    tokenizer = build_tokenizer(_metadata(name))
    bad = mismatches(tokenizer, vectors)
    assert not bad, f"{name}: {len(vectors) - len(bad)}/{len(vectors)} exact; first: {bad[0]!r}"
    reloaded = Tokenizer.from_str(tokenizer.to_str())
    assert not mismatches(reloaded, vectors)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unreproduced_vocabulary_is_refused(name: str) -> None:
    with pytest.raises(GGUFConversionError, match=REFUSED[name]):
        build_tokenizer(_metadata(name))


def test_unknown_pre_tokenizer_is_refused_not_guessed() -> None:
    """A pre-tokenizer not in the table (Kimi-K2's custom Han split, a future name) is refused:
    the old builder fell back to GPT-2 splitting and served different ids (qwen35: 46/50)."""
    meta = dict(_metadata("qwen2"))
    for pre in ("kimi-k2", "some-future-name"):
        meta["tokenizer.ggml.pre"] = pre
        with pytest.raises(GGUFConversionError, match=f"pre-tokenizer '{pre}'"):
            build_tokenizer(meta)


def test_old_fallback_was_wrong_for_qwen35() -> None:
    """What refusing protects against: GPT-2 splitting over the Qwen3.5 vocabulary misses vectors."""
    meta = dict(_metadata("qwen35"))
    meta["tokenizer.ggml.pre"] = "gpt-2"
    assert len(mismatches(build_tokenizer(meta), vocab_vectors("qwen35"))) >= 4


# ------------------------------------------------ names without a test vocabulary

# llama.cpp's regexes (llama-vocab.cpp, applied in order, every match its own piece) for the
# table's names that have no ggml-vocab file.  For gpt-4o/minimax-m2 and tekken these are the
# tokenizer.json originals llama.cpp records beside its adaptation: the adaptation spells
# [\p{Lu}...\p{M}] as ((?=[\p{L}])([^a-z])) and so drops combining marks (Khmer splits differently
# from the real tokenizer there).
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_CPP_SPLITS = {
    "deepseek-v3": [
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ],
    "gpt-4o": [_GPT4O],
    "minimax-m2": [_GPT4O],
    "tekken": [_TEKKEN],
    "glm4": [_LLAMA3],
}


def _llama_cpp_split(text: str, patterns: list[str]) -> list[str]:
    import regex

    pieces = [text]
    for pattern in patterns:
        compiled, out = regex.compile(pattern), []
        for piece in pieces:
            at = 0
            for match in compiled.finditer(piece):
                if match.start() > at:
                    out.append(piece[at : match.start()])
                if match.end() > match.start():
                    out.append(match.group())
                at = match.end()
            if at < len(piece):
                out.append(piece[at:])
        pieces = out
    return pieces


def _unbyte(piece: str) -> str:
    """A byte-level piece (GPT-2's byte alphabet) back to text."""
    from tests.test_gguf_convert import byte_level_alphabet

    inverse = {c: b for b, c in enumerate(byte_level_alphabet())}
    return bytes(inverse[c] for c in piece).decode("utf-8")


def _all_texts() -> list[str]:
    texts: dict[str, None] = {}
    for name in CLAIMED:
        texts.update(dict.fromkeys(text for text, _ in vocab_vectors(name)))
    return list(texts)


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_SPLITS))
def test_transcribed_split_agrees_with_llama_cpp(pre: str) -> None:
    assert pre in PRE_TOKENIZERS
    pre_tokenizer, _, _ = byte_level_split(pre)
    for text in _all_texts():
        ours = [_unbyte(piece) for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
        assert ours == _llama_cpp_split(text, LLAMA_CPP_SPLITS[pre]), text


def test_every_table_name_is_checked() -> None:
    """Every name of the table is covered by a test vocabulary, by the split comparison, or shares
    its definition with one that is."""
    from server.models.gguf_metadata import meta_value

    covered = {meta_value(_metadata(n), "tokenizer.ggml.pre") for n in CLAIMED} | set(LLAMA_CPP_SPLITS)
    checked = [PRE_TOKENIZERS[c] for c in covered if c in PRE_TOKENIZERS]
    for name, spec in PRE_TOKENIZERS.items():
        assert spec in checked, name
