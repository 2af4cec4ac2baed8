"""Random-weight models in real architectures' shapes, for benchmarks: built in memory or saved as a model directory.

Shapes: `llama-1b` (Llama-3.2-1B's config), `smollm2-135m` (the default SmolLM2-135M-Instruct's
config, read from the model cache) and `tiny` (that config cut to two narrow layers: on a CPU its steps
take milliseconds, so the serving path is what a benchmark of it measures). Random weights in a real shape do the same work per token as the
trained ones; with EOS banned or ignored, lengths are fixed. `save_model_dir` writes an mlx-lm model
directory (config.json, model.safetensors and the default SmolLM2 tokenizer's files) that both this
server and `mlx_lm.server` load with `--model DIR`; its vocabulary is set to the tokenizer's, so every
id the model emits decodes. Scripts put the repository root and bench/ on sys.path before importing this.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

LLAMA_1B: dict[str, Any] = {  # Llama-3.2-1B's config (weights random)
    "model_type": "llama",
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
# SmolLM2's config cut to two narrow layers: a step costs a few ms even on a CPU, so the serving path
# around the engine (HTTP, admission, streaming) is what a CPU run of it measures, as on a fast GPU
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
TINY |= {"num_key_value_heads": 2, "head_dim": 16}
SHAPES = ("llama-1b", "smollm2-135m", "tiny")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_DROPPED_KEYS = ("quantization", "quantization_config", "torch_dtype")


def shape_config(shape: str, tokenizer_dir: Path) -> dict[str, Any]:
    """The config.json of a named shape (`smollm2-135m` is read from the default model's directory)."""
    if shape == "llama-1b":
        return dict(LLAMA_1B)
    if shape in ("smollm2-135m", "tiny"):
        config = json.loads((tokenizer_dir / "config.json").read_text())
        config = {k: v for k, v in config.items() if k not in _DROPPED_KEYS}
        return config | TINY if shape == "tiny" else config
    raise ValueError(f"unknown shape {shape!r}: {', '.join(SHAPES)}")


def pick_dtype(name: str) -> mx.Dtype:
    """`auto` = bfloat16 on a GPU, float32 on the CPU; else the named MLX dtype."""
    if name == "auto":
        return mx.bfloat16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32
    return getattr(mx, name)


def random_model(config: dict[str, Any], dtype: mx.Dtype, seed: int = 0) -> Any:
    """An mlx-lm model of this config with random weights cast to dtype, evaluated, in eval mode."""
    from mlx.utils import tree_map
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))
    mx.eval(model.parameters())
    model.eval()
    return model


def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    """Ids the tokenizer can decode: its base vocabulary plus added tokens."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


def save_model_dir(shape: str, dtype_name: str, tokenizer_dir: Path, root: Path, seed: int = 0) -> Path:
    """A model directory of random weights in `shape` under root (built once, reused while present)."""
    dtype = pick_dtype(dtype_name)
    vocab = tokenizer_vocab_size(tokenizer_dir)
    out = root / f"random-{shape}-{str(dtype).split('.')[-1]}-v{vocab}-s{seed}"
    if (out / "config.json").is_file():
        return out
    from mlx_lm.utils import save_config, save_model

    config = shape_config(shape, tokenizer_dir)
    config["vocab_size"] = vocab  # every id the model emits decodes (Llama-1B's 128,256 -> SmolLM2's)
    model = random_model(config, dtype, seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model, donate_model=True)
    save_config(config, config_path=tmp / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, tmp / name)
    tmp.rename(out)
    return out
