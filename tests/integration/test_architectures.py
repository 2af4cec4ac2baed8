"""The paged cache plugs into mlx-lm's model code unchanged: tiny random-weight models of several
families generate exactly what mlx-lm's own single-sequence path generates, and batched prefill
stores the K/V that one-row prefill stores."""

from __future__ import annotations

import importlib
import threading
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from server.engine.engine import Engine, EngineConfig
from server.engine.paged_cache import KVStore, probe_kv_shape, slot_ids
from server.engine.prefill_buckets import PrefillShape, padded_shape
from server.engine.request import GenerationRequest
from server.engine.runner import ModelRunner, padded_batches, prefill_groups
from server.engine.sampling import SamplingParams, SequenceSampler
from server.engine.sequence import Sequence
from server.models.cpu_layers import speed_up_for_cpu
from server.registry import ModelRegistry

VOCAB = 49152  # the default model's tokenizer drives detokenization
COMMON = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB,
    "max_position_embeddings": 2048,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **COMMON, "tie_word_embeddings": True},
    "llama3_rope": {
        "model_type": "llama",
        **COMMON,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "qwen2": {"model_type": "qwen2", **COMMON, "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", **COMMON, "head_dim": 16, "tie_word_embeddings": True, "rope_theta": 1e6},
    "gemma3_text": {
        "model_type": "gemma3_text",
        **COMMON,
        "head_dim": 16,
        "num_hidden_layers": 6,
        "sliding_window": 8,
        "sliding_window_pattern": 3,
        "query_pre_attn_scalar": 16,
    },
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


@pytest.mark.parametrize("model_type", ["llama", "llama3_rope", "qwen2", "qwen3"])
def test_cpu_layers_in_the_engine_generate_what_mlx_lm_generates(model_type: str, registry: ModelRegistry) -> None:
    """The server switches these families to server/models/cpu_layers.py on a CPU: through the paged
    cache, batched prefill and decode rows, the switched model still generates mlx-lm's tokens."""
    tokenizer = registry.get("smollm2-135m-instruct").tokenizer
    stock, switched = build(model_type), build(model_type)
    assert speed_up_for_cpu(switched, mx.cpu) == 2 * CONFIGS[model_type]["num_hidden_layers"]
    engine = Engine(switched, tokenizer, EngineConfig(block_size=8, num_blocks=96))
    engine.start()
    try:
        prompts = [[(i * 7919 + k * 131) % 5000 + 100 for i in range(n)] for k, n in enumerate((37, 12, 25))]
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        results: dict[int, list[int]] = {}

        def run(k: int) -> None:
            results[k] = [
                e.token_id for e in engine.generate(GenerationRequest(f"cpu-{model_type}-{k}", prompts[k], params))
            ]

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [results[k] for k in range(len(prompts))] == [reference(stock, p, 8) for p in prompts]
    finally:
        engine.shutdown()


def _sequence(name: str, prompt: list[int], block_ids: list[int], computed: int) -> Sequence:
    params = SamplingParams(max_tokens=4, temperature=0.0)
    seq = Sequence(name, 0, prompt, params, SequenceSampler(params, prompt), None, 4)  # type: ignore[arg-type]
    seq.block_ids, seq.num_computed_tokens = block_ids, computed
    return seq


@pytest.mark.parametrize("buckets", [False, True], ids=["exact", "bucketed"])
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_batched_prefill_writes_the_kv_of_solo_prefill(model_type: str, buckets: bool) -> None:
    """Rows of different offsets and chunk lengths prefilled together (one forward, the shorter chunks
    padded, a boolean mask, per-row RoPE offsets, the sliding window) store the same K/V as each row
    alone, and the padding never lands in any sequence's slots. Bucketed (prefill_buckets.py, CUDA's
    default): the forward runs 32 tokens over 96 keys instead of 30 over 38 (padded rows: test_prefill_buckets)."""
    model = build(model_type)
    bs = 8
    prompts = [[(i * 7919 + k * 31) % 5000 + 100 for i in range(length)] for k, length in enumerate((30, 22, 41))]
    starts = [0, 8, 5]  # the second and third rows resume after KV computed earlier
    chunks = [29, 13, 30]  # different lengths: one forward of 30, two rows padded
    tables = [list(range(6)), list(range(6, 12)), list(range(12, 18))]
    if buckets:
        assert padded_shape(3, 30, 38) == PrefillShape(3, 32, 96)
    stores = []
    for batched in (False, True):
        store = KVStore(probe_kv_shape(model), num_blocks=18, block_size=bs)
        runner = ModelRunner(model, store, prefill_buckets=buckets and batched)
        seqs = [_sequence(f"s{k}", p, t, 0) for k, (p, t) in enumerate(zip(prompts, tables))]
        for seq, start in zip(seqs, starts):  # the earlier KV, computed alone on both sides
            if start:
                runner.prefill(seq, start)
                seq.num_computed_tokens = start
        if batched:
            assert len(prefill_groups(list(zip(seqs, chunks)), waste=10.0)) == 1
            assert len(padded_batches(list(zip(seqs, chunks)))) == 1
            runner.prefill_rows(list(zip(seqs, chunks)))
        else:
            for seq, n in zip(seqs, chunks):
                runner.prefill(seq, n)
        stores.append(store)
    for seq_table, start, n in zip(tables, starts, chunks):
        slots = mx.array(slot_ids(seq_table, 0, start + n, bs))
        for solo_pool, batch_pool in zip((*stores[0].keys, *stores[0].values), (*stores[1].keys, *stores[1].values)):
            assert mx.allclose(solo_pool[slots], batch_pool[slots], atol=1e-4, rtol=1e-4).item()
    pool_slots = 18 * bs  # every slot but the scratch block's: untouched ones are zeros on both sides
    for solo_pool, batch_pool in zip((*stores[0].keys, *stores[0].values), (*stores[1].keys, *stores[1].values)):
        assert mx.array_equal(solo_pool[:pool_slots] == 0, batch_pool[:pool_slots] == 0).item()


def test_padded_batches_pad_similar_chunks_and_keep_a_long_one_apart() -> None:
    seqs = [_sequence(f"c{k}", list(range(1, 600)), [], 0) for k in range(6)]
    batches = padded_batches(list(zip(seqs, [26, 512, 30, 3, 27, 100])))
    assert [[n for _, n in b] for b in batches] == [[512], [100], [30, 27, 26, 3]]


def test_prefill_groups_keep_short_rows_away_from_long_ones() -> None:
    fresh = [_sequence(f"f{k}", list(range(1, 60)), [], 0) for k in range(3)]
    resumed = _sequence("long", list(range(1, 3000)), [], 2900)
    groups = prefill_groups([(fresh[0], 40), (resumed, 50), (fresh[1], 40), (fresh[2], 30)])
    assert [[s.request_id for s, _ in g] for g in groups] == [["f2", "f0", "f1"], ["long"]]
