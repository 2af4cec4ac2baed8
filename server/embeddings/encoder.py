"""The MLX sentence encoder: owns the BERT / (XLM-)RoBERTa network, its weight loading
from a Hugging Face / sentence-transformers directory, the pooling configuration read
from modules.json and 1_Pooling/config.json, tokenization, and turning batches of token
ids into float32 (optionally L2-normalized) sentence embeddings.

Batching policy (sorting by length, splitting, truncating over-long inputs) is the
caller's job: `Encoder.tokenize` never truncates and `Encoder.embed_ids` refuses inputs
longer than `max_length`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tokenizers import Tokenizer

from server.embeddings import cpu_kernels

_ACTIVATIONS = {
    "gelu": nn.gelu,
    "gelu_python": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_fast": nn.gelu_fast_approx,
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}
_ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
_WEIGHT_PREFIXES = ("bert.", "model.", "roberta.")
_UNUSED_WEIGHTS = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids")
_KNOWN_MODULES = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True)
class EncoderConfig:
    """The subset of a HF config.json the encoder needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int

    @property
    def is_roberta(self) -> bool:
        return self.model_type in _ROBERTA_TYPES

    @property
    def position_offset(self) -> int:
        """First position id of a real token: padding_idx + 1 for RoBERTa, else 0."""
        return self.pad_token_id + 1 if self.is_roberta else 0

    @property
    def max_positions(self) -> int:
        """Longest sequence the position table can represent."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        model_type = d.get("model_type", "bert")
        if model_type != "bert" and model_type not in _ROBERTA_TYPES:
            raise ValueError(f"unsupported encoder model_type {model_type!r}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        roberta = model_type in _ROBERTA_TYPES
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 512),
            type_vocab_size=d.get("type_vocab_size", 1 if roberta else 2),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            hidden_act=d.get("hidden_act", "gelu"),
            pad_token_id=d.get("pad_token_id", 1 if roberta else 0),
        )


# --- network (attribute names mirror HF BERT so safetensors keys load as-is) ---------


class _Embeddings(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, ids: mx.array, positions: mx.array) -> mx.array:
        # Single-segment input: token type 0 everywhere.
        x = self.word_embeddings(ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)


class _DenseLN(nn.Module):
    def __init__(self, n_in: int, n_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        self.LayerNorm = nn.LayerNorm(n_out, eps=eps)

    def __call__(self, h: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(h) + residual)


class _Attention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.n_heads = c.num_attention_heads
        self.self = _SelfAttention(c)
        self.output = _DenseLN(c.hidden_size, c.hidden_size, c.layer_norm_eps)
        self.softmax = cpu_kernels.softmax() if mx.default_device() == mx.cpu else None

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, L, D = x.shape
        h = self.n_heads

        def split(t: mx.array) -> mx.array:
            return t.reshape(B, L, h, D // h).transpose(0, 2, 1, 3)

        q, k, v = split(self.self.query(x)), split(self.self.key(x)), split(self.self.value(x))
        scale = (D // h) ** -0.5
        if self.softmax is not None:  # CPU: MLX's fused attention there computes exp a scalar at a time
            scores = mx.where(mask, (q * scale) @ k.swapaxes(-1, -2), -1e30)
            o = self.softmax(scores) @ v
        else:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        o = o.transpose(0, 2, 1, 3).reshape(B, L, D)
        return self.output(o, x)


class _Intermediate(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        if c.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {c.hidden_act!r}")
        self.act: cpu_kernels.Kernel = _ACTIVATIONS[c.hidden_act]
        if self.act is nn.gelu and mx.default_device() == mx.cpu:
            self.act = cpu_kernels.gelu()

    def __call__(self, x: mx.array) -> mx.array:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseLN(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)  # post-LN, as BERT does


class _Stack(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.layer = [_Layer(c) for _ in range(c.num_hidden_layers)]


class EncoderModel(nn.Module):
    """BERT-family encoder: embeddings + post-LN transformer layers -> hidden states."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Stack(config)

    @property
    def layers(self) -> list[_Layer]:
        """The transformer blocks, under the name mlx-lm's LoRA helpers (linear_to_lora_layers,
        load_adapters) look for, so fine-tuned adapters apply to encoders as to chat models."""
        return self.encoder.layer

    def position_ids(self, mask: mx.array) -> mx.array:
        """Position ids for right-padded rows; RoBERTa starts real tokens at padding_idx+1
        and gives padding the padding_idx itself."""
        c = self.config
        if c.is_roberta:
            m = mask.astype(mx.int32)
            return mx.cumsum(m, axis=1) * m + c.pad_token_id
        return mx.broadcast_to(mx.arange(mask.shape[1])[None], mask.shape)

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        """ids: (B, L) int; mask: (B, L) bool, True on real tokens. Returns (B, L, D)."""
        x = self.embeddings(ids, self.position_ids(mask))
        attn_mask = mask[:, None, None, :]  # every query may attend to real keys only
        for layer in self.encoder.layer:
            x = layer(x, attn_mask)
        return x

    def load_hf_weights(self, weights: dict[str, mx.array]) -> None:
        """Load HF-named weights: strip a leading bert./model./roberta. prefix, drop
        pooler / LM-head / buffers, and insist every parameter is present."""
        clean: dict[str, mx.array] = {}
        for key, value in weights.items():
            for prefix in _WEIGHT_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    break
            if key.startswith(_UNUSED_WEIGHTS):
                continue
            # Some old checkpoints name LayerNorm parameters gamma/beta.
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight")
            key = key.replace("LayerNorm.beta", "LayerNorm.bias")
            clean[key] = value
        self.load_weights(list(clean.items()), strict=True)


# --- pooling ------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolingConfig:
    """How token states become one vector: mean / cls / lasttoken, then maybe L2-normalize."""

    mode: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("mean", "cls", "lasttoken"):
            raise ValueError(f"unsupported pooling mode {self.mode!r}")

    @classmethod
    def from_dir(cls, path: Path) -> PoolingConfig:
        """Read modules.json and the Pooling module's config.json; mean + normalize when
        absent. A Normalize module in modules.json means normalize."""
        path = Path(path)
        modules_file = path / "modules.json"
        pooling_dir = path / "1_Pooling"
        normalize = True
        if modules_file.is_file():
            modules = json.loads(modules_file.read_text())
            kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
            normalize = "Normalize" in kinds
            if "Pooling" in kinds:
                pooling_dir = path / kinds["Pooling"].get("path", "1_Pooling")
        pooling_file = pooling_dir / "config.json"
        if not pooling_file.is_file():
            return cls("mean", normalize)
        p = json.loads(pooling_file.read_text())
        flags = {
            "mean": p.get("pooling_mode_mean_tokens", False),
            "cls": p.get("pooling_mode_cls_token", False),
            "lasttoken": p.get("pooling_mode_lasttoken", False),
            "max": p.get("pooling_mode_max_tokens", False),
            "mean_sqrt_len": p.get("pooling_mode_mean_sqrt_len_tokens", False),
            "weightedmean": p.get("pooling_mode_weightedmean_tokens", False),
        }
        on = [k for k, v in flags.items() if v]
        if len(on) != 1:
            raise ValueError(f"{pooling_file}: need exactly one supported pooling mode, got {on}")
        return cls(on[0], normalize)

    def pool(self, states: mx.array, mask: mx.array) -> mx.array:
        """states (B, L, D), mask (B, L) bool (right padding) -> (B, D) float32."""
        states = states.astype(mx.float32)
        if self.mode == "cls":
            out = states[:, 0]
        elif self.mode == "lasttoken":
            last = mask.astype(mx.int32).sum(axis=1) - 1
            out = mx.take_along_axis(states, last[:, None, None], axis=1)[:, 0]
        else:
            m = mask.astype(mx.float32)[..., None]
            out = (states * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)
        if self.normalize:
            norm = mx.sqrt((out * out).sum(axis=-1, keepdims=True))
            out = out / mx.maximum(norm, 1e-12)
        return out


def right_pad(batch: list[list[int]], pad_id: int, max_length: int) -> tuple[mx.array, mx.array]:
    """(ids, mask) of shape (B, longest): rows right-padded with pad_id, mask True on real tokens.
    Raises ValueError on an empty row or one longer than max_length."""
    lengths = [len(ids) for ids in batch]
    if min(lengths) == 0:
        raise ValueError("cannot embed an empty token sequence")
    if max(lengths) > max_length:
        raise ValueError(f"sequence of {max(lengths)} tokens exceeds max_length {max_length}")
    ids = np.full((len(batch), max(lengths)), pad_id, dtype=np.int32)
    mask = np.zeros(ids.shape, dtype=bool)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = True
    return mx.array(ids), mx.array(mask)


# --- the public encoder -----------------------------------------------------------


class Encoder:
    """A loaded sentence-embedding model: tokenizer + MLX network + pooling."""

    def __init__(
        self,
        model: EncoderModel,
        tokenizer: Any,
        pooling: PoolingConfig,
        max_length: int,
        pad_id: int,
        path: Path | None = None,
    ):
        self.path = path  # the directory it was loaded from
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.pad_id = pad_id
        self.dimensions = model.config.hidden_size
        self.vocab_size = model.config.vocab_size
        bare = tokenizer.encode("", add_special_tokens=True).ids
        # What the tokenizer wraps every text in ([CLS] ... [SEP], <s> ... </s>): at most one
        # leading token, the rest trailing. Token-id inputs get the same wrapping.
        self._wrap = (bare[:1], bare[1:]) if bare else ([], [])

    @classmethod
    def load(cls, path: Path, dtype: mx.Dtype = mx.float32) -> Encoder:
        """Load from a HF / sentence-transformers directory. float32 by default; pass
        mx.float16 only on GPU."""
        path = Path(path)
        modules_file = path / "modules.json"
        if modules_file.is_file():
            for m in json.loads(modules_file.read_text()):
                kind = m.get("type", "").rsplit(".", 1)[-1]
                if kind not in _KNOWN_MODULES:
                    raise ValueError(f"{path}: unsupported sentence-transformers module {kind!r}")
        config = EncoderConfig.from_dict(json.loads((path / "config.json").read_text()))
        model = EncoderModel(config)
        # a .safetensors file loads as a dict of arrays (mx.load is typed for every format it reads)
        model.load_hf_weights(cast(dict[str, mx.array], mx.load(str(path / "model.safetensors"))))
        model.set_dtype(dtype)
        model.eval()
        mx.eval(model.parameters())

        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()

        max_length = config.max_positions
        st_file = path / "sentence_bert_config.json"
        if st_file.is_file():
            max_seq = json.loads(st_file.read_text()).get("max_seq_length")
            if max_seq:
                max_length = min(int(max_seq), max_length)
        return cls(model, tokenizer, PoolingConfig.from_dir(path), max_length, config.pad_token_id, path)

    def special_tokens(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix) ids the tokenizer adds around every text."""
        return self._wrap

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with special tokens, NOT truncated."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def embed_ids(self, batch: list[list[int]]) -> np.ndarray:
        """Embed a batch of token-id lists (any mix of lengths) -> float32 (B, dimensions)."""
        if not batch:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        ids, mask = right_pad(batch, self.pad_id, self.max_length)
        out = self.pooling.pool(self.model(ids, mask), mask)
        mx.eval(out)
        return np.array(out, dtype=np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Convenience: tokenize and embed (raises on inputs longer than max_length)."""
        return self.embed_ids(self.tokenize(texts))
