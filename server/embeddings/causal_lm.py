"""Causal-LM (LLM-based) embedding models: any mlx-lm architecture pooled over its final hidden states.

Models such as Qwen3-Embedding or gte-Qwen2 ship as causal language models plus
sentence-transformers files (`modules.json`, `1_Pooling/config.json`). They are
loaded with mlx-lm, run without the LM head (`model.model(ids)` gives the
final-normed hidden states), and pooled by the same `PoolingConfig` as the
BERT encoders: last-token when the directory says nothing else. Rows are right
padded; with causal attention a real token never sees padding, so a batched
vector equals the solo one. Same interface as `Encoder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from server.embeddings.encoder import Encoder, PoolingConfig, right_pad
from server.models.loading import ENCODER_MODEL_TYPES, load_chat_model

DEFAULT_MAX_LENGTH = 8192


class CausalLMEncoder:
    """A loaded decoder embedding model: mlx-lm network without its head + tokenizer + pooling."""

    def __init__(self, model: Any, tokenizer: Any, pooling: PoolingConfig, max_length: int) -> None:
        backbone = getattr(model, "model", None)
        if backbone is None or not callable(backbone):
            raise ValueError(f"{type(model).__module__} has no `model` backbone to take hidden states from")
        self.backbone = backbone
        self.tokenizer = tokenizer  # a Hugging Face tokenizer (fast)
        self.pooling = pooling
        self.max_length = max_length
        self.vocab_size = (
            int(backbone.embed_tokens.weight.shape[0]) if hasattr(backbone, "embed_tokens") else len(tokenizer)
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        bare = tokenizer("", add_special_tokens=True)["input_ids"]
        specials = set(tokenizer.all_special_ids)
        lead = [t for t in bare[:1] if t == tokenizer.bos_token_id]
        self._wrap = (lead, [t for t in bare[len(lead) :] if t in specials])
        self.dimensions = int(self._probe())

    @classmethod
    def load(cls, path: Path, dtype_policy: str = "auto") -> CausalLMEncoder:
        path = Path(path)
        model, wrapper = load_chat_model(path, dtype_policy)
        has_pooling_file = (path / "1_Pooling" / "config.json").is_file() or (path / "modules.json").is_file()
        pooling = PoolingConfig.from_dir(path) if has_pooling_file else PoolingConfig("lasttoken", True)
        config = json.loads((path / "config.json").read_text())
        max_length = int(config.get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
        st_file = path / "sentence_bert_config.json"
        if st_file.is_file():
            max_seq = json.loads(st_file.read_text()).get("max_seq_length")
            if max_seq:
                max_length = min(int(max_seq), max_length)
        return cls(model, wrapper._tokenizer, pooling, max_length)

    def _probe(self) -> int:
        out = self.backbone(mx.array([[self._wrap[0][0] if self._wrap[0] else 0]]))
        return out.shape[-1]

    def special_tokens(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix) ids the tokenizer adds around every text."""
        return self._wrap

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the tokenizer's special tokens, NOT truncated."""
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    def embed_ids(self, batch: list[list[int]]) -> np.ndarray:
        """Embed a batch of token-id lists (any mix of lengths) -> float32 (B, dimensions)."""
        if not batch:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        ids, mask = right_pad(batch, self.pad_id, self.max_length)
        out = self.pooling.pool(self.backbone(ids), mask)
        mx.eval(out)
        return np.array(out, dtype=np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embed_ids(self.tokenize(texts))


def is_causal_lm_dir(path: Path) -> bool:
    """True when the directory's config names an architecture other than the BERT family."""
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("model_type", "bert") not in ENCODER_MODEL_TYPES


def load_embedding_model(path: Path, dtype_policy: str = "auto") -> Any:
    """An `Encoder` for BERT-family directories, a `CausalLMEncoder` for mlx-lm architectures."""
    if is_causal_lm_dir(path):
        return CausalLMEncoder.load(path, dtype_policy)
    return Encoder.load(path)
