"""The paged cache plugs into mlx-lm's model code unchanged: tiny random-weight models of several
families generate exactly what mlx-lm's own single-sequence path generates."""

from __future__ import annotations

import importlib
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from server.engine.engine import Engine, EngineConfig
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.models.registry import ModelRegistry

VOCAB = 49152  # the default model's tokenizer drives detokenization
COMMON = {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "max_position_embeddings": 2048}
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **COMMON, "tie_word_embeddings": True},
    "llama3_rope": {"model_type": "llama", **COMMON, "tie_word_embeddings": True, "rope_theta": 500000.0,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "qwen2": {"model_type": "qwen2", **COMMON, "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", **COMMON, "head_dim": 16, "tie_word_embeddings": True, "rope_theta": 1e6},
    "gemma3_text": {"model_type": "gemma3_text", **COMMON, "head_dim": 16, "num_hidden_layers": 6,
                    "sliding_window": 8, "sliding_window_pattern": 3, "query_pre_attn_scalar": 16},
}


def build(model_type: str) -> Any:
    module = importlib.import_module(f"mlx_lm.models.{CONFIGS[model_type]['model_type']}")
    mx.random.seed(7)
    model = module.Model(module.ModelArgs.from_dict(CONFIGS[model_type]))
    model.update(model.parameters())  # random init as constructed
    mx.eval(model.parameters())
    return model


def reference(model: Any, prompt: list[int], n: int) -> list[int]:
    cache = make_prompt_cache(model)
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=cache)]


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_family_matches_mlx_lm(model_type: str, registry: ModelRegistry) -> None:
    tokenizer = registry.get("smollm2-135m-instruct").tokenizer
    model = build(model_type)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, num_blocks=64, decode_ahead=True))
    engine.start()
    try:
        prompt = [(i * 7919) % 5000 + 100 for i in range(37)]  # spans several blocks (and the sliding window)
        want = reference(model, prompt, 10)
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        got = [e.token_id for e in engine.generate(GenerationRequest(f"{model_type}-1", prompt, params))]
        assert got == want
        # a second turn resumes from the pool and still matches a from-scratch run
        turn2 = prompt + want + [321, 654, 987]
        events = engine.generate(GenerationRequest(f"{model_type}-2", turn2, params))
        assert events[-1].cached_tokens > 0
        assert [e.token_id for e in events] == reference(model, turn2, 10)
    finally:
        engine.shutdown()
