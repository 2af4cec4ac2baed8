"""Tiny random-weight models of the families with native tool formats, for tests: real chat templates over
real vocabularies (llama.cpp's vocab-only GGUFs), with the family's marker tokens added where the vocabulary
lacks them.

Where the sdist has the family's vocabulary (Qwen and the R1-Distill-Qwen: qwen2/qwen35, Llama 3.x and the
R1-Distill-Llama: llama-bpe) it is used as is,
with Qwen's added tokens at their real ids. Where it has none (Mistral's tekken, GLM, Kimi, MiniMax,
DeepSeek-V3, LFM2), a byte-level vocabulary stands in and the family's markers are added at new ids (Qwen's
placeholder ids for qwen2, appended for llama-bpe; never a token the
vocabulary already has, which llguidance refuses): `control` tokens are special (skipped when decoding),
`marks` are user-defined (decoded as text, as the families' tool markers are).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from tests.real_vocab import QWEN3_ADDED, template_text, vocab_metadata

_QWEN_FIRST_ADDED = 151646


@dataclass(frozen=True)
class Family:
    """One family's tiny model: vocabulary, template, architecture, EOS and added tokens."""

    vocab: str
    template: str
    fmt: str  # the tool-call format `tool_formats.detect_format` must find
    model_type: str = "llama"
    eos: str | None = None
    qwen_added: tuple[str, ...] = ()
    control: tuple[str, ...] = ()
    marks: tuple[str, ...] = ()
    real_vocab: bool = True  # False: a byte-level stand-in vocabulary
    extra: dict[str, Any] = field(default_factory=dict)


_MISTRAL = dict(
    vocab="llama-bpe",
    eos="</s>",
    control=("<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]"),
    marks=(
        "[/AVAILABLE_TOOLS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
        "[TOOL_CALLS]",
        "[ARGS]",
        "[CALL_ID]",
        "[THINK]",
        "[/THINK]",
    ),
    real_vocab=False,
)
_QWEN_STANDIN = dict(vocab="qwen2", real_vocab=False)
_GLM_ADDED = (
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<think>",
    "</think>",
    "<tool_response>",
    "</tool_response>",
)
# Gemma 4 (gemma4_text) at tiny size: no KV-shared layers, a small per-layer input, one sliding layer per global one
_GEMMA4_TEXT = {
    "head_dim": 16,
    "global_head_dim": 16,
    "num_kv_shared_layers": 0,
    "hidden_size_per_layer_input": 8,
    "sliding_window": 128,
    "sliding_window_pattern": 2,
    "use_double_wide_mlp": False,
}
_DS = (
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
)

_DS_ADDED = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    *_DS,
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
)
# the R1 distill of Llama 3.1: Llama 3's vocabulary with DeepSeek's markers (appended here)
_R1_LLAMA = dict(
    vocab="llama-bpe",
    eos="<｜end▁of▁sentence｜>",
    control=_DS_ADDED[:4],
    marks=_DS_ADDED[4:],
)
# LFM2 / LFM2.5 (pythonic calls): a byte-level stand-in for their own BPE, with their markers
_LFM2 = dict(
    vocab="llama-bpe",
    fmt="pythonic",
    eos="<|im_end|>",
    control=("<|startoftext|>", "<|im_start|>", "<|im_end|>"),
    marks=(
        "<|tool_list_start|>",
        "<|tool_list_end|>",
        "<|tool_call_start|>",
        "<|tool_call_end|>",
        "<|tool_response_start|>",
        "<|tool_response_end|>",
        "<think>",
        "</think>",
    ),
    real_vocab=False,
)

FAMILIES: dict[str, Family] = {
    "qwen3": Family("qwen2", "Qwen-Qwen3-0.6B", "hermes", "qwen3", "<|im_end|>", QWEN3_ADDED),
    "qwq": Family("qwen2", "Qwen-QwQ-32B", "hermes", "qwen2", "<|im_end|>", QWEN3_ADDED),
    "qwen3.5": Family("qwen35", "Qwen3.5-4B", "qwen3_coder", "qwen3", "<|im_end|>", QWEN3_ADDED),
    "qwen3-coder": Family("qwen2", "Qwen3-Coder", "qwen3_coder", "qwen3", "<|im_end|>", QWEN3_ADDED),
    "llama3.1": Family("llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", "llama3", eos="<|eot_id|>"),
    "llama3.2": Family("llama-bpe", "meta-llama-Llama-3.2-3B-Instruct", "llama3", eos="<|eot_id|>"),
    "llama3.3": Family("llama-bpe", "meta-llama-Llama-3.3-70B-Instruct", "llama3", eos="<|eot_id|>"),
    "hermes3": Family(
        "llama-bpe",
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
        "hermes",
        eos="<|im_end|>",
        control=("<|im_start|>", "<|im_end|>"),
        marks=("<tool_call>", "</tool_call>"),
    ),
    "hermes2pro": Family(
        "llama-bpe",
        "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
        "hermes",
        eos="<|im_end|>",
        control=("<|im_start|>", "<|im_end|>"),
        marks=("<tool_call>", "</tool_call>"),
    ),
    "functionary3.1": Family("llama-bpe", "meetkai-functionary-medium-v3.1", "functionary31", eos="<|eot_id|>"),
    "functionary3.2": Family("llama-bpe", "meetkai-functionary-medium-v3.2", "functionary32", eos="<|eot_id|>"),
    "gemma4": Family("gemma-4", "google-gemma-4-31B-it", "gemma4", "gemma4_text", "<turn|>", extra=_GEMMA4_TEXT),
    "mistral-small-3.2": Family(template="Mistral-Small-3.2-24B-Instruct-2506", fmt="mistral", **_MISTRAL),  # type: ignore[arg-type]
    "devstral": Family(template="unsloth-mistral-Devstral-Small-2507", fmt="mistral", **_MISTRAL),  # type: ignore[arg-type]
    "ministral-reasoning": Family(template="mistralai-Ministral-3-14B-Reasoning-2512", fmt="mistral", **_MISTRAL),  # type: ignore[arg-type]
    "deepseek-v3.1": Family(
        template="deepseek-ai-DeepSeek-V3.1",
        fmt="deepseek_v31",
        eos="<｜end▁of▁sentence｜>",
        qwen_added=_DS_ADDED,
        **_QWEN_STANDIN,  # type: ignore[arg-type]
    ),
    "deepseek-r1-qwen": Family(
        "qwen2", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "deepseek_r1", "qwen2", _DS_ADDED[1], _DS_ADDED
    ),
    "deepseek-r1-llama": Family(template="deepseek-ai-DeepSeek-R1-Distill-Llama-8B", fmt="deepseek_r1", **_R1_LLAMA),  # type: ignore[arg-type]
    "lfm2": Family(template="LFM2-8B-A1B", **_LFM2),  # type: ignore[arg-type]
    "lfm2.5": Family(template="LFM2.5-8B-A1B", **_LFM2),  # type: ignore[arg-type]
    "lfm2.5-instruct": Family(template="LFM2.5-Instruct", **_LFM2),  # type: ignore[arg-type]
    "deepseek-v3.2": Family(
        template="deepseek-ai-DeepSeek-V3.2",
        fmt="dsml",
        eos="<｜end▁of▁sentence｜>",
        qwen_added=(
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
            "<think>",
            "</think>",
        ),
        **_QWEN_STANDIN,  # type: ignore[arg-type]
    ),
    "glm-4.6": Family(
        template="GLM-4.6",
        fmt="glm47",
        eos="<|user|>",
        qwen_added=_GLM_ADDED,
        **_QWEN_STANDIN,  # type: ignore[arg-type]
    ),
    "glm-4.7": Family(
        template="GLM-4.7-Flash",
        fmt="glm47",
        eos="<|user|>",
        qwen_added=_GLM_ADDED,
        **_QWEN_STANDIN,  # type: ignore[arg-type]
    ),
    "kimi-k2": Family(
        template="moonshotai-Kimi-K2",
        fmt="kimi_k2",
        eos="<|im_end|>",
        qwen_added=(
            "<|im_system|>",
            "<|im_user|>",
            "<|im_assistant|>",
            "<|im_middle|>",
            "<|tool_calls_section_begin|>",
            "<|tool_calls_section_end|>",
            "<|tool_call_begin|>",
            "<|tool_call_argument_begin|>",
            "<|tool_call_end|>",
        ),
        **_QWEN_STANDIN,  # type: ignore[arg-type]
    ),
    "minimax-m2": Family(
        template="MiniMax-M2",
        fmt="minimax_m2",
        eos="[e~[",
        qwen_added=("]~!b[", "]~b]", "[e~[", "<minimax:tool_call>", "</minimax:tool_call>", "<think>", "</think>"),
        **_QWEN_STANDIN,  # type: ignore[arg-type]
    ),
}

# Poolside Laguna writes GLM-4.7's calls; its turns are plain tags (`</assistant>` ends one)
_LAGUNA = dict(
    fmt="glm47",
    eos="</assistant>",
    qwen_added=("</assistant>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
    + ("<think>", "</think>"),
    **_QWEN_STANDIN,
)
_KIMI_K3 = dict(
    vocab="llama-bpe",
    fmt="kimi_k3",
    eos="<|end_of_msg|>",
    control=("<|end_of_msg|>",),
    marks=("<|open|>", "<|close|>", "<|sep|>"),
    real_vocab=False,
)
FAMILIES.update(
    {
        "laguna-xs.2": Family(template="poolside-Laguna-XS.2", **_LAGUNA),  # type: ignore[arg-type]
        "laguna-xs-2.1": Family(template="poolside-Laguna-XS-2.1", **_LAGUNA),  # type: ignore[arg-type]
        "laguna-s-2.1": Family(template="poolside-Laguna-S-2.1", **_LAGUNA),  # type: ignore[arg-type]
        "minicpm5": Family(
            "qwen2", "openbmb-MiniCPM5-1B", "minicpm5", "qwen3", "<|im_end|>", QWEN3_ADDED, real_vocab=False
        ),
        # Spark 2.5 writes GLM-4.7's calls (`<arg_key>`), turns opened by `<｜start▁of▁sentence｜><|Role|>`
        "spark2.5": Family(
            template="Spark2.5",
            fmt="glm47",
            eos="<｜end▁of▁sentence｜>",
            qwen_added=(
                "<｜start▁of▁sentence｜>",
                "<｜end▁of▁sentence｜>",
                "<|System|>",
                "<|User|>",
                "<|Bot|>",
                "<|Tool|>",
            )
            + (
                "<tool_call>",
                "</tool_call>",
                "<arg_key>",
                "</arg_key>",
                "<arg_value>",
                "</arg_value>",
                "<think>",
                "</think>",
            ),
            **_QWEN_STANDIN,  # type: ignore[arg-type]
        ),
        # Kimi K3's XTML tags: a byte-level stand-in with them added (`<|end_of_msg|>` ends a message)
        "kimi-k3": Family(template="Kimi-K3", **_KIMI_K3),  # type: ignore[arg-type]
        "kimi-k3-no-thinking": Family(template="Kimi-K3", **_KIMI_K3),  # type: ignore[arg-type]
        "muse-glimmer": Family(
            template="muse-glimmer",
            fmt="muse_spark",
            eos="<|eot|>",
            qwen_added=("<|start|>", "<|message|>", "<|eot|>", "<|eom|>"),
            **_QWEN_STANDIN,  # type: ignore[arg-type]
        ),
    }
)


def _qwen_placeholders(meta: dict[str, Any], added: tuple[str, ...]) -> dict[str, Any]:
    """Fill Qwen's placeholder ids from 151646 with `added` (`<|...|>` and `<｜...｜>` style are special)."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    for offset, token in enumerate(added):
        tokens[_QWEN_FIRST_ADDED + offset] = token
        special = (token.startswith("<|") and "tool" not in token and "arg" not in token) or token in _SPECIAL_MISC
        types[_QWEN_FIRST_ADDED + offset] = 3 if special else 4
    return {**meta, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32)}


_SPECIAL_MISC = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "[gMASK]", "<sop>", "]~!b[", "]~b]", "[e~[")


def _appended(meta: dict[str, Any], control: tuple[str, ...], marks: tuple[str, ...]) -> dict[str, Any]:
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    for token, kind in [*((t, 3) for t in control), *((t, 4) for t in marks)]:
        if token in tokens:
            types[tokens.index(token)] = kind
            continue
        tokens.append(token)
        types.append(kind)
    return {**meta, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32)}


def family_model_dir(out: Path, family: Family, seed: int = 0) -> Path:
    """An mlx-lm directory: a tiny random `family.model_type` model with the family's tokenizer and template."""
    from mlx.utils import tree_flatten

    from server.models.gguf_tokenizer import build_tokenizer, write_tokenizer_files

    meta = dict(vocab_metadata(family.vocab))
    if family.qwen_added:
        meta = _qwen_placeholders(meta, family.qwen_added)
    if family.control or family.marks:
        meta = _appended(meta, family.control, family.marks)
    meta["tokenizer.chat_template"] = template_text(family.template)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(meta)
    write_tokenizer_files(meta, out, model_max_length=4096, tokenizer=tokenizer)
    config_path = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    if family.eos is not None:
        tokenizer_config["eos_token"] = family.eos
    config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    config: dict[str, Any] = {
        "model_type": family.model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "rope_theta": 1e6,
        **family.extra,
    }
    if family.model_type == "qwen3":
        config["head_dim"] = 16
    if "hidden_size_per_layer_input" in config:  # Gemma 4's per-layer input embeddings span the vocabulary
        config["vocab_size_per_layer_input"] = config["vocab_size"]
    if family.eos is not None:
        config["eos_token_id"] = tokenizer.token_to_id(family.eos)
    module = importlib.import_module(f"mlx_lm.models.{family.model_type}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
