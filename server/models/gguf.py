"""GGUF -> MLX model directory: weights, config.json and (via gguf_tokenizer) the tokenizer files.

This module owns reading a llama.cpp GGUF file with MLX's own loader, checking its tensor types,
renaming its tensors to the Hugging Face / mlx-lm layout, undoing llama.cpp's RoPE row permutation
of llama Q/K weights, building config.json (with a per-module ``quantization`` section) from the
GGUF metadata, and writing a directory that ``mlx_lm.load`` accepts as is.  The tokenizer half
(``tokenizer.json`` and friends from ``tokenizer.ggml.*``) lives in
:mod:`server.models.gguf_tokenizer`.

Q4_0, Q4_1 and Q8_0 tensors stay quantized (MLX affine, group size 32, 4 or 8 bits); F32, F16 and
BF16 tensors are kept as plain arrays (MLX's loader reads BF16 as float16).  Every other GGML type
is refused: MLX's loader either fails on it or, for K-quants, dequantizes it to float16 -- and its
Q4_K dequantization does not match ggml's, so those files are not silently accepted.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from server.models import gguf_tokenizer
from server.models.gguf_metadata import GGUFConversionError, meta_value

log = logging.getLogger(__name__)

__all__ = ["GGUFConversionError", "convert_gguf", "meta_value", "read_tensor_types"]


# GGML tensor type ids (ggml.h) -> name.  Only the first six are accepted.
_SUPPORTED_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 30: "BF16"}
_OTHER_TYPES = {
    6: "Q5_0",
    7: "Q5_1",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
}

# general.architecture -> (model_type, HF architecture class, Q/K rows permuted by llama.cpp).
# llama.cpp's convert_hf_to_gguf.py permutes Q/K only in LlamaModel (llama, mistral, ...);
# Qwen2Model writes them unchanged (transformers' GGUF loader reverse-permutes only "llama" too).
_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# "bias" is a layer's own bias; "scales"/"biases" are the halves of MLX's quantization.
_TENSOR_RE = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|bias|scales|biases)$")
_GROUP_SIZE = 32  # every GGML block type MLX keeps quantized has 32 weights per block


def read_tensor_types(path: Path) -> dict[str, int]:
    """Each tensor's GGML type id, read from the GGUF header (MLX's loader does not report it)."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise GGUFConversionError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise GGUFConversionError(f"{path}: GGUF version {version} is too old (need 2 or later)")
        pos = 24
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

        def skip(kind: int, pos: int) -> int:
            if kind in sizes:
                return pos + sizes[kind]
            if kind == 8:  # string: u64 length + bytes
                return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
            if kind == 9:  # array: u32 item type, u64 count, items
                item, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item in sizes:
                    return pos + sizes[item] * count
                for _ in range(count):
                    pos = skip(item, pos)
                return pos
            raise GGUFConversionError(f"{path}: unknown GGUF metadata value type {kind}")

        for _ in range(n_kv):
            pos = skip(8, pos)  # key
            (kind,) = struct.unpack_from("<I", buf, pos)
            pos = skip(kind, pos + 4)
        types: dict[str, int] = {}
        for _ in range(n_tensors):
            (length,) = struct.unpack_from("<Q", buf, pos)
            name = bytes(buf[pos + 8 : pos + 8 + length]).decode("utf-8")
            (n_dims,) = struct.unpack_from("<I", buf, pos + 8 + length)
            pos += 8 + length + 4 + 8 * n_dims
            (types[name],) = struct.unpack_from("<I", buf, pos)
            pos += 12  # type u32 + data offset u64
        return types


def _check_tensor_types(path: Path) -> dict[str, int]:
    types = read_tensor_types(path)
    bad = {n: t for n, t in types.items() if t not in _SUPPORTED_TYPES}
    if bad:
        kinds = sorted({_OTHER_TYPES.get(t, f"type id {t}") for t in bad.values()})
        raise GGUFConversionError(
            f"{path.name}: unsupported GGML tensor type(s) {', '.join(kinds)} (e.g. {next(iter(bad))}); "
            f"supported: {', '.join(_SUPPORTED_TYPES.values())}"
        )
    return types


def _hf_name(gguf_name: str) -> str:
    match = _TENSOR_RE.match(gguf_name)
    base = match and (_BLOCK_NAMES if match[1] is not None else _GLOBAL_NAMES).get(match[2])
    if match is None or not base:
        raise GGUFConversionError(f"unsupported GGUF tensor {gguf_name!r}")
    prefix = f"model.layers.{match[1]}." if match[1] is not None else ""
    return f"{prefix}{base}.{match[3]}"


def _unpermute_rows(n_rows: int, n_head: int) -> mx.array:
    """Row order undoing llama.cpp's ``permute``: HF row (h, s, i) is GGUF row (h, i, s).

    llama.cpp reshapes each head's rows to (2, head_dim/2) and transposes them, so that RoPE
    pairs become adjacent (interleaved RoPE); this gives back the half-split (NeoX/HF) layout.
    """
    head_dim = n_rows // n_head
    order = np.arange(n_rows).reshape(n_head, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)
    return mx.array(order)


def _llama3_rope_scaling(factors: list[float], theta: float, dim: int) -> dict[str, Any]:
    """Recover HF's ``llama3`` rope_scaling from llama.cpp's precomputed ``rope_freqs`` tensor."""
    factor = max(factors)
    wavelen = 2 * math.pi / theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    for old_len in (8192, 4096, 16384, 32768, 2048, 65536, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
            smooth = (old_len / wavelen - low) / (high - low)
            expected = np.where(
                wavelen < old_len / high,
                1.0,
                np.where(wavelen > old_len / low, factor, 1 / ((1 - smooth) / factor + smooth)),
            )
            if len(factors) == len(expected) and np.allclose(expected, factors, rtol=1e-3):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": old_len,
                }
    raise GGUFConversionError("the rope_freqs tensor does not match any Llama 3 rope scaling")


def _rope_scaling(
    meta: dict[str, Any], arch: str, rope_freqs: mx.array | None, theta: float, head_dim: int
) -> dict[str, Any] | None:
    kind = meta_value(meta, f"{arch}.rope.scaling.type")
    factor = meta_value(meta, f"{arch}.rope.scaling.factor")
    if rope_freqs is not None:
        return _llama3_rope_scaling(np.array(rope_freqs.astype(mx.float32)).tolist(), theta, head_dim)
    if kind in (None, "none") or factor in (None, 0.0, 1.0):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"type": "yarn", "factor": factor}
        original = meta_value(meta, f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = original
        for key in ("beta_fast", "beta_slow"):
            if (value := meta_value(meta, f"{arch}.rope.scaling.yarn_{key}")) is not None:
                scaling[key] = value
        return scaling
    raise GGUFConversionError(f"unsupported RoPE scaling type {kind!r}")


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    """A per-model scalar; llama.cpp may store some (head counts, FFN size) per layer."""
    value = meta_value(meta, key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFConversionError(f"{key} varies per layer ({value}); not supported")
        value = value[0]
    return value


def _build_config(meta: dict[str, Any], weights: dict[str, mx.array], rope_freqs: mx.array | None) -> dict[str, Any]:
    arch = meta_value(meta, "general.architecture")
    model_type, hf_class, _ = _ARCHITECTURES[arch]
    name = str(meta_value(meta, "general.name") or "")
    if arch == "llama" and "mistral" in name.lower():
        model_type, hf_class = "mistral", "MistralForCausalLM"  # llama.cpp writes Mistral as llama

    def req(key: str) -> Any:
        value = _scalar(meta, f"{arch}.{key}")
        if value is None:
            raise GGUFConversionError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = req("embedding_length"), req("attention.head_count")
    kv_heads = _scalar(meta, f"{arch}.attention.head_count_kv", heads)
    head_dim = _scalar(meta, f"{arch}.attention.key_length") or hidden // heads
    rope_dim = _scalar(meta, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFConversionError(f"partial RoPE ({rope_dim} of {head_dim} head dims) is not supported")
    theta = _scalar(meta, f"{arch}.rope.freq_base", 10000.0)
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": req("block_count"),
        "intermediate_size": req("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": req("attention.layer_norm_rms_epsilon"),
        "rope_theta": theta,
        "rope_traditional": False,
        "max_position_embeddings": req("context_length"),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in weights,
        "mlp_bias": "model.layers.0.mlp.up_proj.bias" in weights,
    }
    if (scaling := _rope_scaling(meta, arch, rope_freqs, theta, head_dim)) is not None:
        config["rope_scaling"] = scaling
    for key, gguf_key in (("bos", "bos"), ("pad", "padding")):
        if (token_id := meta_value(meta, f"tokenizer.ggml.{gguf_key}_token_id")) is not None:
            config[f"{key}_token_id"] = token_id
    eos = [meta_value(meta, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    """config["quantization"]: the most common bit width, plus an entry for every module that differs.

    mlx-lm's loader (``class_predicate`` in ``mlx_lm.utils.load_model``) returns the entry keyed
    by a module's path when there is one, else the top-level group size / bits.
    """
    bits: dict[str, int] = {}
    for key, scales in weights.items():
        if key.endswith(".scales"):
            module = key[: -len(".scales")]
            in_dims = scales.shape[-1] * _GROUP_SIZE
            bits[module] = weights[f"{module}.weight"].shape[-1] * 32 // in_dims
    if not bits:
        return None
    default = Counter(bits.values()).most_common(1)[0][0]
    quant: dict[str, Any] = {"group_size": _GROUP_SIZE, "bits": default, "mode": "affine"}
    for module, b in sorted(bits.items()):
        if b != default:
            quant[module] = {"group_size": _GROUP_SIZE, "bits": b, "mode": "affine"}
    return quant


def _load(gguf_path: Path) -> tuple[dict[str, mx.array], dict[str, Any], dict[str, int]]:
    types = _check_tensor_types(gguf_path)
    try:
        return (*mx.load(str(gguf_path), return_metadata=True), types)
    except (RuntimeError, ValueError) as exc:
        raise GGUFConversionError(f"MLX could not read {gguf_path.name}: {exc}") from exc


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write weights + config.json + tokenizer.json + tokenizer_config.json (+ special_tokens_map.json,
    generation_config.json) into out_dir (exists, empty), so that ``mlx_lm.load(out_dir)`` works.

    Raises GGUFConversionError for an unsupported architecture, tensor type or tokenizer model.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    raw, meta, types = _load(gguf_path)
    arch = meta_value(meta, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise GGUFConversionError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(_ARCHITECTURES))}"
        )
    _, _, permuted = _ARCHITECTURES[arch]
    heads = _scalar(meta, f"{arch}.attention.head_count")
    kv_heads = _scalar(meta, f"{arch}.attention.head_count_kv", heads)

    rope_freqs = raw.pop("rope_freqs.weight", None)
    weights: dict[str, mx.array] = {}
    for gguf_name, array in raw.items():
        name = _hf_name(gguf_name)
        if permuted and re.search(r"\.attn_[qk]\.", gguf_name):
            n_head = heads if ".attn_q." in gguf_name else kv_heads
            array = array[_unpermute_rows(array.shape[0], n_head)]
        if types.get(gguf_name) == 30 and not mx.all(mx.isfinite(array)).item():  # BF16 -> float16
            raise GGUFConversionError(f"{gguf_name} (BF16) has values outside the float16 range")
        weights[name] = array
    if "model.embed_tokens.weight" not in weights:
        raise GGUFConversionError(f"{gguf_path.name} has no token_embd tensor")

    config = _build_config(meta, weights, rope_freqs)
    if (quant := _quantization(weights)) is not None:
        config["quantization"] = quant
    try:  # may refuse: before anything is written
        tokenizer = gguf_tokenizer.build_tokenizer(meta)
    except GGUFConversionError:
        raise
    except Exception as exc:  # the tokenizers library rejecting the vocabulary or merges
        raise GGUFConversionError(f"cannot build a tokenizer from {gguf_path.name}: {exc}") from exc
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    gguf_tokenizer.write_tokenizer_files(
        meta, out_dir, model_max_length=config["max_position_embeddings"], tokenizer=tokenizer
    )
    log.info("converted %s (%s, %d tensors) into %s", gguf_path.name, arch, len(weights), out_dir)
