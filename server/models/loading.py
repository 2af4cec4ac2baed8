"""Where a model's files come from (hub repo, local directory, GGUF file) and how weights are loaded.

``resolve_source`` turns a --model source into a ready MLX directory in the
cache; ``load_chat_model`` loads one with mlx-lm under the dtype policy: on
the CPU backend quantized weights are dequantized to float32 (MLX's CPU
quantized matmul is scalar and slow; float32 uses BLAS), on Metal/CUDA they
stay quantized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from server.models.cache import ModelCache
from server.models.kind import ModelKind

log = logging.getLogger(__name__)

ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "nomic_bert", "modernbert"})
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py"]


class ModelSourceError(ValueError):
    """A --model source that cannot be used: missing path, bad directory, unreachable repo."""


def convert_gguf_into(gguf_path: Path, out_dir: Path) -> None:
    """Convert a GGUF file into an MLX model directory (out_dir exists and is empty)."""
    # imported here: it loads MLX, and the command line imports this module without it
    from server.models.gguf import convert_gguf

    log.info("converting %s to MLX (once)", gguf_path)
    convert_gguf(gguf_path, out_dir)


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()
    return f"gguf--{path.stem}--{hashlib.sha256(ident).hexdigest()[:12]}"


def download_from_hub(repo_id: str, cache: ModelCache, offline: bool) -> Path:
    """Snapshot a Hugging Face repo into the cache (huggingface-hub prints its progress bar)."""
    # huggingface-hub and MLX are imported where used: the command line imports this module without them
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id, cache_dir=str(cache.root / "hub"), allow_patterns=HUB_PATTERNS, local_files_only=offline
        )
    except LocalEntryNotFoundError as exc:
        raise ModelSourceError(f"{repo_id} is not in the cache and the hub cannot be reached ({exc})") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelSourceError(f"could not download {repo_id}: {exc}") from exc
    return Path(path)


def resolve_source(source: str, cache: ModelCache, offline: bool = False) -> Path:
    """Return a local model directory for a hub repo id, a local directory or a GGUF file."""
    path = Path(os.path.expanduser(source))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {path} does not exist")
        return cache.build(_gguf_key(path), f"gguf:{path.resolve()}", lambda out: convert_gguf_into(path, out))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} has no config.json: not a model directory")
        return path
    if not HUB_REPO_ID.match(source):
        raise ModelSourceError(f"{source!r} is neither an existing path nor a hub repo id (org/name)")
    return download_from_hub(source, cache, offline)


def detect_kind(path: Path) -> ModelKind:
    """Encoder (sentence-transformers style) directories embed; everything else chats."""
    if (path / "modules.json").is_file():
        return "embedding"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{path}/config.json is unreadable: {exc}") from exc
    return "embedding" if config.get("model_type") in ENCODER_MODEL_TYPES else "chat"


def weights_dtype(policy: str) -> str | None:
    """The float dtype to load weights in, or None to keep them as stored (quantized stays quantized)."""
    import mlx.core as mx

    if policy == "keep":
        return None
    if policy == "auto":
        return "float32" if mx.default_device() == mx.cpu else None
    return policy


def load_chat_tokenizer(path: Path) -> Any:
    """An mlx-lm model directory's tokenizer alone, exactly as `load_chat_model` loads it (no weights)."""
    from mlx_lm.utils import load_config, load_tokenizer

    return load_tokenizer(path, eos_token_ids=load_config(path).get("eos_token_id"))


def load_chat_model(path: Path, policy: str = "auto") -> tuple[Any, Any]:
    """Load an mlx-lm model and tokenizer from a directory, applying the dtype policy."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import dequantize_model, load

    model, tokenizer = load(str(path))[:2]  # (model, tokenizer, config) only with return_config=True
    dtype_name = weights_dtype(policy)
    if dtype_name is not None:
        dtype = getattr(mx, dtype_name)
        if getattr(model, "args", None) is not None and hasattr(model.args, "quantization"):
            model.args.quantization = None
        model = dequantize_model(model)
        params = tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters())
        model.update(params)
        mx.eval(model.parameters())
    model.eval()
    return model, tokenizer
