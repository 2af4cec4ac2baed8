"""Real tokenizers and chat templates for tests: llama.cpp's vocab-only GGUF files and its template
collection, as the `llama-cpp-python` source distribution on PyPI ships them.

`llama_cpp_file("models/ggml-vocab-qwen2.gguf")` returns the extracted file (the sdist is fetched
once with `pip download` into the model cache's downloads, then only the needed members are kept).
`tiny_model_dir(...)` builds an mlx-lm directory around one: random weights of a tiny model of
the given family, the vocabulary's tokenizer files, and a real chat template, so real formats
(special tokens, template markup, tool markers) meet the real engine without real weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from server.config import resolve_cache_dir

PACKAGE = "llama-cpp-python==0.3.36"
_PREFIX = "vendor/llama.cpp/"


def _extracted_root() -> Path:
    return resolve_cache_dir(None) / "downloads" / "llama-cpp-python-0.3.36"


def llama_cpp_file(member: str) -> Path:
    """A file of llama.cpp's tree (relative to `vendor/llama.cpp/`), fetched and extracted once."""
    root = _extracted_root()
    target = root / member
    if target.is_file():
        return target
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            PACKAGE,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download {PACKAGE} failed: {result.stderr[-2000:]}")
        staging = Path(tmp) / "staging"
        with tarfile.open(sdists[0]) as archive:
            for info in archive.getmembers():
                _, _, rest = info.name.partition("/")
                if not rest.startswith(_PREFIX) or not info.isfile():
                    continue
                inner = rest[len(_PREFIX) :]
                if inner.startswith("models/ggml-vocab-") or inner.startswith("models/templates/"):
                    info.name = inner
                    archive.extract(info, staging, filter="data")
        if root.exists():  # another process extracted it meanwhile
            return target if target.is_file() else _missing(member)
        staging.rename(root)
    return target if target.is_file() else _missing(member)


def _missing(member: str) -> Path:
    raise FileNotFoundError(f"{PACKAGE} has no vendor/llama.cpp/{member}")


def vocab_metadata(name: str) -> dict[str, Any]:
    """The GGUF metadata of `models/ggml-vocab-NAME.gguf` (tokenizer.ggml.* keys)."""
    _, meta = mx.load(str(llama_cpp_file(f"models/ggml-vocab-{name}.gguf")), return_metadata=True)
    return meta


# The added tokens of Qwen2.5 (151646-151664) and Qwen3 (also 151665-151668), which the vocab-only
# GGUF (a Qwen1.5-era vocabulary) holds as `[PADn]` placeholders at the same ids. `<|...|>` markers
# are special in Qwen's tokenizer.json (GGUF type 3, control); the tool and thinking tags are not
# (type 4, user-defined), so they decode as text.
QWEN25_ADDED = (
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN3_ADDED = (*QWEN25_ADDED, "<tool_response>", "</tool_response>", "<think>", "</think>")
_FIRST_ADDED = 151646


def with_added_tokens(meta: dict[str, Any], added: tuple[str, ...]) -> dict[str, Any]:
    """A copy of vocab metadata whose placeholder ids from 151646 on hold `added` (Qwen's real ids)."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    for offset, token in enumerate(added):
        tokens[_FIRST_ADDED + offset] = token
        types[_FIRST_ADDED + offset] = 3 if token.startswith("<|") else 4
    out = dict(meta)
    out["tokenizer.ggml.tokens"] = tokens
    out["tokenizer.ggml.token_type"] = mx.array(types, dtype=mx.int32)
    return out


def template_text(name: str) -> str:
    """The text of `models/templates/NAME.jinja`."""
    return llama_cpp_file(f"models/templates/{name}.jinja").read_text()


def tiny_model_dir(
    out: Path,
    *,
    vocab: str,
    template: str,
    model_type: str = "qwen2",
    eos_token: str | None = None,
    added: tuple[str, ...] = (),
    seed: int = 0,
    config_extra: dict[str, Any] | None = None,
) -> Path:
    """An mlx-lm model directory: a tiny random-weight `model_type` model over a real vocabulary and
    chat template. `eos_token` overrides the vocabulary's EOS (Qwen chat models end turns with
    `<|im_end|>`); `added` fills Qwen's added tokens in (`QWEN25_ADDED`, `QWEN3_ADDED`); `config_extra`
    adds or overrides config.json keys."""
    import importlib

    from mlx.utils import tree_flatten

    from server.models.gguf_tokenizer import build_tokenizer, write_tokenizer_files

    meta = dict(vocab_metadata(vocab))
    if added:
        meta = with_added_tokens(meta, added)
    meta["tokenizer.chat_template"] = template_text(template)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(meta)
    write_tokenizer_files(meta, out, model_max_length=4096, tokenizer=tokenizer)
    if eos_token is not None:
        config_path = out / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text())
        tokenizer_config["eos_token"] = eos_token
        config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    config: dict[str, Any] = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "rope_theta": 1e6,
    }
    if model_type == "qwen3":
        config["head_dim"] = 16
    if eos_token is not None:
        config["eos_token_id"] = tokenizer.token_to_id(eos_token)
    config.update(config_extra or {})
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
