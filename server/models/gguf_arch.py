"""What differs per GGUF architecture: model type, tensor names, weight fix-ups, extra config keys.

:func:`server.models.gguf.convert_gguf` reads ``general.architecture`` and asks this module for
an :class:`Architecture`: the mlx-lm / Hugging Face ``model_type`` and class, whether llama.cpp
permuted the Q/K rows (only its LlamaModel does), how GGUF tensor names map to Hugging Face ones,
whether norm weights were stored shifted by +1 (Gemma's ``(1 + w)`` RMSNorm, which llama.cpp folds
into the weight), and the config keys the architecture needs beyond the common ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from server.models.gguf_metadata import GGUFConversionError, meta_value

__all__ = ["ARCHITECTURES", "Architecture", "architecture", "hf_tensor_name"]

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 2/3 blocks have four norms: llama.cpp's ffn_norm is the pre-feed-forward one.
_GEMMA_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# "bias" is a layer's own bias; "scales"/"biases" are the halves of MLX's quantization.
_TENSOR_RE = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|bias|scales|biases)$")
# Gemma 3: every 6th layer attends globally; llama.cpp fixes the pattern and the local RoPE base.
_GEMMA3_SLIDING_PATTERN, _GEMMA3_LOCAL_ROPE_BASE, _GEMMA3_27B_LAYERS = 6, 10000.0, 62


def _gemma3_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3 keys llama.cpp does not store: it derives them the same way (llama-model.cpp)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    # Gemma 3 27B scales queries by hidden/heads (168), the other sizes by the head dimension.
    scalar = hidden // heads if config["num_hidden_layers"] == _GEMMA3_27B_LAYERS else config["head_dim"]
    window = meta_value(meta, "gemma3.attention.sliding_window")
    if window is None:
        raise GGUFConversionError("GGUF metadata lacks gemma3.attention.sliding_window")
    extra: dict[str, Any] = {
        "query_pre_attn_scalar": scalar,
        "sliding_window": window,
        "sliding_window_pattern": _GEMMA3_SLIDING_PATTERN,
        "rope_local_base_freq": meta_value(meta, "gemma3.rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE),
        "hidden_activation": "gelu_pytorch_tanh",
    }
    if (softcap := meta_value(meta, "gemma3.final_logit_softcapping")) is not None:
        raise GGUFConversionError(f"Gemma 3 with final_logit_softcapping ({softcap}) is not supported")
    return extra


def _no_extra(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Architecture:
    """How one ``general.architecture`` converts (see the module docstring)."""

    model_type: str
    hf_class: str
    permuted_qk: bool = False
    norm_shift: float = 0.0
    block_names: dict[str, str] = field(default_factory=lambda: _BLOCK_NAMES)
    extra_config: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] = _no_extra


# llama.cpp's convert_hf_to_gguf.py permutes Q/K only in LlamaModel (llama, mistral, ...); its
# Qwen2/Qwen3/Gemma3 converters write them unchanged (transformers' GGUF loader reverse-permutes only llama).
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM"),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM"),
    "gemma3": Architecture(
        "gemma3_text", "Gemma3ForCausalLM", norm_shift=1.0, block_names=_GEMMA_BLOCK_NAMES, extra_config=_gemma3_config
    ),
}


def architecture(arch: str) -> Architecture:
    """The conversion of ``general.architecture``; GGUFConversionError for one not supported."""
    if arch not in ARCHITECTURES:
        raise GGUFConversionError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[arch]


def hf_tensor_name(gguf_name: str, arch: Architecture) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (GGUFConversionError if unknown)."""
    match = _TENSOR_RE.match(gguf_name)
    base = match and (arch.block_names if match[1] is not None else _GLOBAL_NAMES).get(match[2])
    if match is None or not base:
        raise GGUFConversionError(f"unsupported GGUF tensor {gguf_name!r}")
    prefix = f"model.layers.{match[1]}." if match[1] is not None else ""
    return f"{prefix}{base}.{match[3]}"
