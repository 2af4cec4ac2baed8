"""Unit tests for server/embeddings/encoder.py: pooling config, padding invariance,
weight loading and the RoBERTa position-id offset (tiny random models + MiniLM)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from server.embeddings.encoder import Encoder, EncoderConfig, EncoderModel, PoolingConfig


def _tiny_config(model_type: str) -> dict:
    roberta = model_type != "bert"
    return {
        "model_type": model_type,
        "vocab_size": 40,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 40 if roberta else 38,
        "type_vocab_size": 1 if roberta else 2,
        "layer_norm_eps": 1e-5 if roberta else 1e-12,
        "hidden_act": "gelu",
        "pad_token_id": 1 if roberta else 0,
    }


def _tiny_tokenizer(path: Path, roberta: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<s>", "<pad>", "</s>", "<unk>"] if roberta else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = [f"w{i}" for i in range(40 - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    unk = "<unk>" if roberta else "[UNK]"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = ("<s>", "</s>") if roberta else ("[CLS]", "[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    tok.enable_truncation(4)  # Encoder.load must switch this off
    tok.save(str(path / "tokenizer.json"))


def _tiny_model_dir(tmp_path: Path, model_type: str, prefix: str = "") -> Path:
    cfg = _tiny_config(model_type)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mx.random.seed(0)
    model = EncoderModel(EncoderConfig.from_dict(cfg))
    weights = {prefix + k: v for k, v in tree_flatten(model.parameters())}
    # Make LayerNorm affine parameters non-trivial so the test can tell them apart.
    for k in list(weights):
        if "LayerNorm" in k:
            weights[k] = weights[k] + 0.1 * mx.random.normal(weights[k].shape)
    weights[prefix + "pooler.dense.weight"] = mx.zeros((32, 32))
    weights[prefix + "pooler.dense.bias"] = mx.zeros((32,))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    _tiny_tokenizer(tmp_path, roberta=model_type != "bert")
    return tmp_path


# --- pooling config -----------------------------------------------------------------


def _write_st(path: Path, modules: list[str] | None, pooling: dict | None, pool_dir="1_Pooling"):
    path.mkdir(parents=True, exist_ok=True)
    if modules is not None:
        entries = [
            {
                "idx": i,
                "name": str(i),
                "path": pool_dir if m == "Pooling" else "",
                "type": f"sentence_transformers.models.{m}",
            }
            for i, m in enumerate(modules)
        ]
        (path / "modules.json").write_text(json.dumps(entries))
    if pooling is not None:
        (path / pool_dir).mkdir(exist_ok=True)
        (path / pool_dir / "config.json").write_text(json.dumps(pooling))


def test_pooling_defaults_when_absent(tmp_path: Path):
    assert PoolingConfig.from_dir(tmp_path) == PoolingConfig("mean", True)


@pytest.mark.parametrize(
    ("modules", "flag", "expected"),
    [
        (["Transformer", "Pooling", "Normalize"], "pooling_mode_mean_tokens", PoolingConfig("mean", True)),
        (["Transformer", "Pooling"], "pooling_mode_mean_tokens", PoolingConfig("mean", False)),
        (["Transformer", "Pooling"], "pooling_mode_cls_token", PoolingConfig("cls", False)),
        (["Transformer", "Pooling", "Normalize"], "pooling_mode_cls_token", PoolingConfig("cls", True)),
        (["Transformer", "Pooling", "Normalize"], "pooling_mode_lasttoken", PoolingConfig("lasttoken", True)),
    ],
)
def test_pooling_config_parsing(tmp_path: Path, modules, flag, expected):
    pooling = {
        "word_embedding_dimension": 8,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_cls_token": False,
        "pooling_mode_max_tokens": False,
        flag: True,
    }
    _write_st(tmp_path, modules, pooling)
    assert PoolingConfig.from_dir(tmp_path) == expected


def test_pooling_dir_taken_from_modules_json(tmp_path: Path):
    _write_st(tmp_path, ["Transformer", "Pooling"], {"pooling_mode_cls_token": True}, pool_dir="pool")
    assert PoolingConfig.from_dir(tmp_path) == PoolingConfig("cls", False)


def test_pooling_rejects_unsupported_modes(tmp_path: Path):
    _write_st(tmp_path, ["Transformer", "Pooling"], {"pooling_mode_max_tokens": True})
    with pytest.raises(ValueError):
        PoolingConfig.from_dir(tmp_path)
    with pytest.raises(ValueError):
        PoolingConfig("max", True)


def test_minilm_pooling_and_shape(minilm: Encoder):
    assert minilm.pooling == PoolingConfig("mean", True)
    assert minilm.dimensions == 384
    assert minilm.max_length == 256


# --- padding invariance ---------------------------------------------------------------


LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog near the riverbank."] * 12)


def test_minilm_padding_invariance(minilm: Encoder):
    short, long = minilm.tokenize(["A cat sat on the mat.", LONG_TEXT])
    assert len(long) > 5 * len(short)
    alone = minilm.embed_ids([short])
    batched = minilm.embed_ids([long, short, short[:3]])
    assert alone.dtype == np.float32 and batched.shape == (3, 384)
    assert np.abs(alone[0] - batched[1]).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_tokenize_does_not_truncate_and_embed_rejects_overlong(minilm: Encoder):
    (ids,) = minilm.tokenize([LONG_TEXT * 3])
    assert len(ids) > minilm.max_length  # tokenizer.json asks for 128: switched off
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    with pytest.raises(ValueError):
        minilm.embed_ids([ids])
    assert minilm.embed_ids([]).shape == (0, 384)


@pytest.mark.parametrize("model_type", ["bert", "xlm-roberta"])
@pytest.mark.parametrize("mode", ["mean", "cls", "lasttoken"])
def test_tiny_padding_invariance_all_modes(tmp_path: Path, model_type: str, mode: str):
    enc = Encoder.load(_tiny_model_dir(tmp_path, model_type))
    enc.pooling = PoolingConfig(mode, normalize=False)
    short = [5, 6, 7]
    long = list(range(4, 30))
    alone = enc.embed_ids([short])
    batched = enc.embed_ids([long, short])
    assert np.abs(alone[0] - batched[1]).max() < 1e-5


# --- weight loading / architecture ------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "bert.", "model."])
def test_loads_prefixed_weights_and_ignores_pooler(tmp_path: Path, prefix: str):
    enc = Encoder.load(_tiny_model_dir(tmp_path, "bert", prefix))
    assert enc.dimensions == 32 and enc.max_length == 38
    (ids,) = enc.tokenize(["w1 w2 w3 w4 w5 w6"])
    assert ids == [2, 5, 6, 7, 8, 9, 10, 3]  # truncation in tokenizer.json switched off
    out = enc.embed_ids([ids])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_roberta_position_ids_start_after_padding_idx(tmp_path: Path):
    enc = Encoder.load(_tiny_model_dir(tmp_path, "xlm-roberta"))
    cfg = enc.model.config
    assert cfg.is_roberta and cfg.position_offset == 2 and cfg.type_vocab_size == 1
    assert enc.max_length == 40 - 2
    mask = mx.array([[True, True, True, False], [True, True, True, True]])
    assert enc.model.position_ids(mask).tolist() == [[2, 3, 4, 1], [2, 3, 4, 5]]
    bert = EncoderModel(EncoderConfig.from_dict(_tiny_config("bert")))
    assert bert.position_ids(mask).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize(("model_type", "hf_class"), [("bert", "BertModel"), ("xlm-roberta", "XLMRobertaModel")])
def test_tiny_model_matches_transformers(tmp_path: Path, model_type: str, hf_class: str):
    """Same random weights through HF transformers (torch CPU) and through EncoderModel."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = _tiny_model_dir(tmp_path, model_type)
    enc = Encoder.load(path)
    ref = getattr(transformers, hf_class).from_pretrained(str(path), add_pooling_layer=False).eval()
    pad = enc.pad_id
    rows = [
        [0 if model_type != "bert" else 2, 5, 9, 11, 2 if model_type != "bert" else 3],
        [0 if model_type != "bert" else 2, 7, 2 if model_type != "bert" else 3],
    ]
    width = max(map(len, rows))
    ids = np.full((2, width), pad, dtype=np.int64)
    mask = np.zeros((2, width), dtype=bool)
    for r, seq in enumerate(rows):
        ids[r, : len(seq)], mask[r, : len(seq)] = seq, True
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
    theirs = theirs.last_hidden_state.numpy()
    ours = np.array(enc.model(mx.array(ids.astype(np.int32)), mx.array(mask)))
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-4)
