"""A tiny gpt-oss for tests: mlx-lm's `gpt_oss` architecture at toy size, random weights, a byte-level
BPE vocabulary carrying the harmony special tokens, and gpt-oss's real chat template.

No vocab-only GGUF in llama.cpp's test data carries gpt-oss's o200k_harmony vocabulary, so the
tokenizer is Llama 3's byte-level BPE vocabulary (`ggml-vocab-llama-bpe.gguf`, the cl100k family
that o200k extends) with its 256 special slots renamed to o200k_harmony's, in o200k_harmony's order:
id 128000 is `<|startoftext|>` (199998 in gpt-oss), 128001 `<|endoftext|>`, 128004 `<|return|>`,
128005 `<|constrain|>`, 128007 `<|channel|>`, 128008 `<|start|>`, 128009 `<|end|>`, 128010
`<|message|>`, 128014 `<|call|>` (the real ids less 71998); the rest are `<|reserved_N|>`. All are
control tokens (special), as in gpt-oss's tokenizer.json. As in gpt-oss's generation_config,
`<|return|>`, `<|endoftext|>` and `<|call|>` end a generation; no BOS is added.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from tests.real_vocab import template_text, vocab_metadata

TEMPLATE = "openai-gpt-oss-120b"
_SHIFT = 199998 - 128000  # o200k_harmony id - this vocabulary's id, for the special range
HARMONY_SPECIALS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
}
EOS_TOKENS = ("<|return|>", "<|endoftext|>", "<|call|>")


def harmony_vocab_metadata() -> dict[str, Any]:
    """llama-bpe's vocab metadata with its special slots renamed to o200k_harmony's (see the docstring)."""
    meta = dict(vocab_metadata("llama-bpe"))
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    for index in range(128000, len(tokens)):
        real = index + _SHIFT
        tokens[index] = HARMONY_SPECIALS.get(real, f"<|reserved_{real}|>")
        types[index] = 3  # control: a special added token
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = mx.array(types, dtype=mx.int32)
    meta["tokenizer.ggml.bos_token_id"] = tokens.index("<|startoftext|>")
    meta["tokenizer.ggml.eos_token_id"] = tokens.index("<|return|>")
    meta["tokenizer.ggml.add_bos_token"] = False
    meta["tokenizer.chat_template"] = template_text(TEMPLATE)
    return meta


def _config(vocab_size: int, eos: list[int]) -> dict[str, Any]:
    """gpt-oss-20b's config.json at toy size: alternating sliding/full attention, top-2 of 4 experts, YaRN."""
    return {
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
        "max_position_embeddings": 131072,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "eos_token_id": eos,
    }


def harmony_model_dir(out: Path, seed: int = 0) -> Path:
    """An mlx-lm directory of a tiny random-weight gpt-oss with the harmony tokenizer and real template."""
    from mlx.utils import tree_flatten

    from server.models.gguf_tokenizer import build_tokenizer, write_tokenizer_files

    meta = harmony_vocab_metadata()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(meta)
    write_tokenizer_files(meta, out, model_max_length=131072, tokenizer=tokenizer)
    eos = [tokenizer.token_to_id(t) for t in EOS_TOKENS]
    config = _config(tokenizer.get_vocab_size(with_added_tokens=True), eos)
    module = importlib.import_module("mlx_lm.models.gpt_oss")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": tokenizer.token_to_id("<|startoftext|>"), "eos_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out
