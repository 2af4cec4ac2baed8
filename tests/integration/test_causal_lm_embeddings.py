"""Causal-LM (decoder-only) embedding models: a tiny random-weight qwen3 / llama saved as a
sentence-transformers directory, embedded by `CausalLMEncoder` and by sentence-transformers
(transformers' own Qwen3Model / LlamaModel) on the same files."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from server.embeddings.causal_lm import CausalLMEncoder, load_embedding_model
from server.models.loading import detect_kind
from server.registry import ModelRegistry

CHAT_ID = "smollm2-135m-instruct"
COMMON = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 49152,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
CONFIGS = {
    "qwen3": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        **COMMON,
        "head_dim": 16,
        "rope_theta": 1e6,
    },
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **COMMON},
}
TEXTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog, twice.",
    "a",
    "机器学习是人工智能的一个重要分支。",
    "def f(x):\n    return x * 2",
]


def _make_dir(root: Path, model_type: str, pooling: str, registry: ModelRegistry) -> Path:
    path = root / f"{model_type}-{pooling}"
    path.mkdir()
    cfg = CONFIGS[model_type]
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(3)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    mx.save_safetensors(
        str(path / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "pt"}
    )
    (path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}))
    chat_dir = Path(registry.get(CHAT_ID).path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (chat_dir / name).is_file():
            shutil.copy(chat_dir / name, path / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 64,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_lasttoken": pooling == "lasttoken",
            }
        )
    )
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    return path


@pytest.mark.parametrize(("model_type", "pooling"), [("qwen3", "lasttoken"), ("llama", "mean")])
def test_decoder_embeddings_match_sentence_transformers(
    tmp_path: Path, registry: ModelRegistry, model_type: str, pooling: str
) -> None:
    st = pytest.importorskip("sentence_transformers")
    path = _make_dir(tmp_path, model_type, pooling, registry)
    assert detect_kind(path) == "embedding"
    ours = load_embedding_model(path)
    assert isinstance(ours, CausalLMEncoder)
    assert ours.dimensions == 64 and ours.max_length == 256
    assert ours.pooling.mode == pooling and ours.pooling.normalize

    mine = ours.embed(TEXTS)
    # transformers pads on the right here too; sentence-transformers pools with the mask.
    reference = st.SentenceTransformer(str(path), device="cpu")
    theirs = reference.encode(TEXTS, batch_size=8, convert_to_numpy=True)
    np.testing.assert_allclose(np.linalg.norm(mine, axis=1), 1.0, atol=1e-3)
    cos = (mine * theirs).sum(axis=1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(theirs, axis=1))
    assert cos.min() >= 0.999, cos


def test_decoder_batch_equals_solo_and_rejects_overlong(tmp_path: Path, registry: ModelRegistry) -> None:
    ours = load_embedding_model(_make_dir(tmp_path, "qwen3", "lasttoken", registry))
    batched = ours.embed(TEXTS)
    solo = np.concatenate([ours.embed([t]) for t in TEXTS])
    assert np.abs(batched - solo).max() < 1e-5
    with pytest.raises(ValueError, match="max_length"):
        ours.embed_ids([[5] * 257])


def test_decoder_model_served_over_http(tmp_path: Path, registry: ModelRegistry) -> None:
    """`--model qwen-embed=DIR` on a decoder directory with sentence-transformers files is served
    by /v1/embeddings (and refused by chat)."""
    import openai

    from server.app import create_app
    from server.config import ModelSpec, Settings
    from server.model_lifecycle import build_registry, shutdown
    from server.registry import ModelRegistry as Registry
    from tests.serving import running_server

    path = _make_dir(tmp_path, "qwen3", "lasttoken", registry)
    settings = Settings(
        cache_dir=tmp_path / "cache", models=(ModelSpec("qwen-embed", str(path)),), default_models=False
    )
    own = Registry()
    build_registry(own, settings)
    assert own.ready, own.failure
    try:
        with running_server(create_app(settings, own)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            got = client.embeddings.create(model="qwen-embed", input=TEXTS[:2])
            vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
            np.testing.assert_allclose(vectors, own.get("qwen-embed").encoder.embed(TEXTS[:2]), atol=1e-5)
            assert got.usage.prompt_tokens == sum(len(ids) for ids in own.get("qwen-embed").encoder.tokenize(TEXTS[:2]))
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model="qwen-embed", messages=[{"role": "user", "content": "hi"}])
    finally:
        shutdown(own)
