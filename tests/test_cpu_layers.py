"""The CPU attention and SwiGLU compute what MLX's fused attention and mlx-lm's modules compute, for
every mask kind the engine's caches hand a model, and switching a model changes nothing else."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from server.config import Settings
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.model_lifecycle import load, unload
from server.models.cpu_layers import CPU_CLASSES, attention, silu_times, speed_up_for_cpu
from server.registry import ModelRegistry, ServedModel

COMMON = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "intermediate_size": 96,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **COMMON, "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", **COMMON, "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", **COMMON, "head_dim": 16, "tie_word_embeddings": True, "rope_theta": 1e6},
}


def build(config: dict[str, Any]) -> nn.Module:
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(3)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def qkv(batch: int, length: int, width: int, heads: int = 6, kv_heads: int = 2) -> tuple[mx.array, ...]:
    mx.random.seed(batch * 1000 + length * 10 + width)
    q = mx.random.normal((batch, heads, length, 16))
    k = mx.random.normal((batch, kv_heads, width, 16))
    v = mx.random.normal((batch, kv_heads, width, 16))
    return q, k, v


def fused(q: mx.array, k: mx.array, v: mx.array, mask: Any) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)


@pytest.mark.parametrize("batch,length,width", [(1, 1, 40), (1, 9, 40), (3, 1, 40), (3, 5, 23)])
def test_attention_matches_fused_attention_without_a_mask(batch: int, length: int, width: int) -> None:
    q, k, v = qkv(batch, length, width)
    assert mx.allclose(attention(q, k, v, 0.25, None), fused(q, k, v, None), atol=1e-5).item()


def test_causal_mask_aligns_the_queries_with_the_last_keys() -> None:
    q, k, v = qkv(1, 7, 30)
    got = attention(q, k, v, 0.25, "causal")
    assert mx.allclose(got, fused(q, k, v, "causal"), atol=1e-5).item()
    # the first query sees keys 0..23 only: changing the later keys' values leaves it alone
    v2 = mx.concatenate([v[:, :, :24], v[:, :, 24:] + 100], axis=2)
    assert mx.allclose(attention(q, k, v2, 0.25, "causal")[:, :, 0], got[:, :, 0], atol=1e-5).item()
    with pytest.raises(ValueError):
        attention(q, k, v, 0.25, "sliding")


def test_boolean_masks_of_the_engine_shapes() -> None:
    # batched prefill: (B, 1, L, S); decode rows: (B, 1, 1, W); per-head: (B, H, L, S)
    for batch, length, width, heads in ((3, 4, 20, 1), (4, 1, 33, 1), (2, 3, 12, 6)):
        q, k, v = qkv(batch, length, width)
        mx.random.seed(width)
        mask = mx.random.uniform(shape=(batch, heads, length, width)) < 0.7
        mask[..., 0] = True  # every query sees something
        assert mx.allclose(attention(q, k, v, 0.25, mask), fused(q, k, v, mask), atol=1e-5).item()


def test_additive_mask() -> None:
    q, k, v = qkv(2, 3, 17)
    mx.random.seed(1)
    mask = mx.random.normal((2, 1, 3, 17)) * 3
    assert mx.allclose(attention(q, k, v, 0.25, mask), fused(q, k, v, mask), atol=1e-5).item()


def test_a_fully_hidden_row_stays_finite() -> None:
    """A padding row of a batched prefill may see no key at all: no NaN comes out of it."""
    q, k, v = qkv(2, 3, 10)
    mask = mx.ones((2, 1, 3, 10), dtype=mx.bool_)
    mask[1, :, 2] = False
    out = attention(q, k, v, 0.25, mask)
    assert not mx.isnan(out).any().item()
    assert mx.allclose(out[0], fused(q, k, v, mask)[0], atol=1e-5).item()


def test_silu_times_matches_silu_and_saturates_cleanly() -> None:
    mx.random.seed(0)
    gate = mx.concatenate([mx.random.normal((500,)) * 6, mx.array([-200.0, -90.0, -1e-8, 0.0, 90.0, 200.0])])
    up = mx.random.normal(gate.shape)
    want = nn.silu(gate) * up
    got = silu_times(gate, up)
    assert not mx.isnan(got).any().item()
    assert mx.allclose(got, want, atol=1e-6, rtol=1e-5).item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_switched_model_computes_the_same_logits(family: str) -> None:
    stock, switched = build(FAMILIES[family]), build(FAMILIES[family])
    before = [name for name, _ in tree_flatten(switched.parameters())]
    assert speed_up_for_cpu(switched, mx.cpu) == 2 * COMMON["num_hidden_layers"]
    assert [name for name, _ in tree_flatten(switched.parameters())] == before
    assert all(type(layer.self_attn) in CPU_CLASSES.values() for layer in switched.layers)
    assert all(isinstance(layer.mlp, type(stock.layers[0].mlp)) for layer in switched.layers)  # still the family's
    prompt = mx.array([[(i * 37) % 500 + 3 for i in range(21)]])
    caches = make_prompt_cache(stock), make_prompt_cache(switched)
    logits = [model(prompt, cache=cache) for model, cache in zip((stock, switched), caches)]
    assert mx.allclose(logits[0], logits[1], atol=1e-4).item()
    token = logits[0][:, -1:].argmax(-1)
    steps = [model(token, cache=cache) for model, cache in zip((stock, switched), caches)]
    assert mx.allclose(steps[0], steps[1], atol=1e-4).item()
    # without a cache (a training-style forward) too
    assert mx.allclose(stock(prompt), switched(prompt), atol=1e-4).item()


def test_nothing_switches_off_the_cpu_or_outside_the_known_families() -> None:
    model = build(FAMILIES["llama"])
    assert speed_up_for_cpu(model, mx.gpu) == 0
    assert type(model.layers[0].self_attn) not in CPU_CLASSES.values()
    gemma = build(
        {
            "model_type": "gemma3_text",
            **COMMON,
            "head_dim": 16,
            "sliding_window": 8,
            "sliding_window_pattern": 3,
            "query_pre_attn_scalar": 16,
        }
    )
    assert speed_up_for_cpu(gemma, mx.cpu) == 0
    assert speed_up_for_cpu(model, mx.cpu) == 2 * COMMON["num_hidden_layers"]
    assert speed_up_for_cpu(model, mx.cpu) == 0  # already switched: idempotent


def test_served_models_are_switched_unless_exact_layers_are_asked_for(smollm2_dir: Path, tmp_path: Path) -> None:
    """The server's model loading applies the switch on a CPU; --exact-cpu-layers keeps mlx-lm's modules."""
    switched_types = set(CPU_CLASSES.values())
    for exact in (False, True):
        registry = ModelRegistry()
        registry.add(ServedModel(id="chat", kind="chat", path=smollm2_dir))
        settings = Settings(
            cache_dir=tmp_path / "cache", data_dir=tmp_path / "data", exact_cpu_layers=exact, kv_cache_gb=0.01
        )
        load(registry, settings)
        served = registry.get("chat")
        try:
            kinds = {type(layer.self_attn) in switched_types for layer in served.model.model.layers}
            assert kinds == {not exact and mx.default_device() == mx.cpu}
            events = served.engine.generate(
                GenerationRequest(f"exact-{exact}", [1, 2, 3, 4], SamplingParams(max_tokens=2, temperature=0.0))
            )
            assert events and events[-1].finish_reason is not None
        finally:
            unload(served)
