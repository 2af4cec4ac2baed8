"""Thinking-model families for reasoning tests: real chat templates over real (or stand-in) vocabularies.

`FAMILIES` names, per family, the real llama.cpp template and the vocab-only GGUF its tokenizer is built
from. Where the sdist has no vocabulary of the family (GLM, Kimi, MiniMax, Mistral's tekken), a byte-level
BPE vocabulary of similar kind stands in: their think markers are then several tokens of text, which the
splitter must still find. `think_tokenizer(root, family)` builds (once per directory) and loads the
tokenizer as mlx-lm does; `stream_text(tokenizer, ids)` decodes ids one at a time with the engine's
incremental detokenizer, as the server streams them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.real_vocab import QWEN3_ADDED, template_text, vocab_metadata, with_added_tokens


@dataclass(frozen=True)
class Family:
    template: str
    vocab: str
    added: tuple[str, ...] = ()  # Qwen's added tokens (tests/real_vocab.py)
    eos_token: str | None = None
    stand_in: bool = False  # the vocabulary is not the family's own
    # think markers as the family's vocabulary holds them: (id or None to append, text, GGUF token type:
    # 4 user-defined, decoded as text; 3 control, dropped by the detokenizer)
    markers: tuple[tuple[int | None, str, int], ...] = ()


# Llama 3's reserved ids that R1-Distill-Llama and SmolLM3 give their think tags
_LLAMA_THINK = ((128013, "<think>", 4), (128014, "</think>", 4))
_SMOL_THINK = ((128002, "<think>", 4), (128003, "</think>", 4))
_APPENDED_THINK = ((None, "<think>", 4), (None, "</think>", 4))
_MISTRAL_THINK = ((None, "[THINK]", 3), (None, "[/THINK]", 3))


FAMILIES = {
    "qwen3": Family("Qwen-Qwen3-0.6B", "qwen2", QWEN3_ADDED, "<|im_end|>"),
    "qwen3.5": Family("Qwen3.5-4B", "qwen35", QWEN3_ADDED, "<|im_end|>"),
    "qwq": Family("Qwen-QwQ-32B", "qwen2", QWEN3_ADDED, "<|im_end|>"),
    "r1-distill-qwen": Family("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "qwen2", QWEN3_ADDED),
    "r1-distill-llama": Family("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "llama-bpe", markers=_LLAMA_THINK),
    "deepseek-v3.1": Family("deepseek-ai-DeepSeek-V3.1", "deepseek-llm", stand_in=True, markers=_APPENDED_THINK),
    "deepseek-v3.2": Family("deepseek-ai-DeepSeek-V3.2", "deepseek-llm", stand_in=True, markers=_APPENDED_THINK),
    "glm-4.6": Family("GLM-4.6", "qwen2", QWEN3_ADDED, stand_in=True),
    "glm-4.7": Family("GLM-4.7-Flash", "qwen2", QWEN3_ADDED, stand_in=True),
    "kimi-k2-thinking": Family("Kimi-K2-Thinking", "qwen2", QWEN3_ADDED, stand_in=True),
    "minimax-m2": Family("MiniMax-M2", "qwen2", QWEN3_ADDED, stand_in=True),
    "smollm3": Family("HuggingFaceTB-SmolLM3-3B", "llama-bpe", markers=_SMOL_THINK),
    "ministral-reasoning": Family(
        "mistralai-Ministral-3-14B-Reasoning-2512", "llama-bpe", stand_in=True, markers=_MISTRAL_THINK
    ),
}


def with_markers(meta: dict[str, Any], markers: tuple[tuple[int | None, str, int], ...]) -> dict[str, Any]:
    """A copy of vocab metadata with the marker tokens put at their ids (or appended)."""
    import mlx.core as mx

    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    for token_id, text, kind in markers:
        if token_id is None:
            tokens.append(text)
            types.append(kind)
        else:
            tokens[token_id], types[token_id] = text, kind
    out = dict(meta)
    out["tokenizer.ggml.tokens"] = tokens
    out["tokenizer.ggml.token_type"] = mx.array(types, dtype=mx.int32)
    return out


def tokenizer_dir(out: Path, family: Family) -> Path:
    """tokenizer.json and its config for a family (no weights)."""
    from server.models.gguf_tokenizer import build_tokenizer, write_tokenizer_files

    if (out / "tokenizer.json").is_file():
        return out
    meta = dict(vocab_metadata(family.vocab))
    if family.added:
        meta = with_added_tokens(meta, family.added)
    if family.markers:
        meta = with_markers(meta, family.markers)
    meta["tokenizer.chat_template"] = template_text(family.template)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(meta)
    write_tokenizer_files(meta, out, model_max_length=4096, tokenizer=tokenizer)
    if family.eos_token is not None:
        path = out / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["eos_token"] = family.eos_token
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


def think_tokenizer(root: Path, name: str) -> Any:
    """The family's tokenizer, loaded as mlx-lm loads a model's (a TokenizerWrapper)."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tokenizer_dir(root / name, FAMILIES[name]))


def stream_text(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id's text as the engine streams it (the last piece includes the detokenizer's flush)."""
    from server.engine.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    if pieces:
        pieces[-1] += detok.flush()
    return pieces
