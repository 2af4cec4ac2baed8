"""Bucketed prefill (server/engine/prefill_buckets.py) on a real model: the padding changes no result, the
warm-up runs every fresh shape before serving and writes no block, and a burst runs only warmed shapes.

The engine buckets on CUDA by default; these tests force it on here, so the path a GPU takes runs in CI.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from server.engine.engine import Engine, EngineConfig
from server.engine.paged_cache import KVStore, slot_ids
from server.engine.prefill_buckets import PrefillShape, bucket, template_prefix, warm_shapes
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.engine.sequence import Sequence
from server.registry import ModelRegistry
from tests.integration.test_batch_engine import chat_tokens, reference, request, tokens_of

BS = 16


@pytest.fixture(scope="module")
def smol(registry: ModelRegistry) -> tuple[Any, Any]:
    served = registry.get("smollm2-135m-instruct")
    return served.model, served.tokenizer


class ShapeLog:
    """Records the shape of every padded prefill forward a runner builds."""

    def __init__(self, runner: ModelRunner) -> None:
        self.shapes: list[PrefillShape] = []
        forward = runner._forward_padded

        def recorded(rows: list[list[int]], starts: list[int], step: int, tables: list[list[int]], width: int) -> Any:
            self.shapes.append(PrefillShape(len(rows), step, width))
            return forward(rows, starts, step, tables, width)

        runner._forward_padded = recorded  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def bucketed(smol: tuple[Any, Any]) -> Iterator[tuple[Engine, ShapeLog]]:
    model, tokenizer = smol
    config = EngineConfig(
        block_size=BS,
        num_blocks=192,
        prefill_buckets=True,
        scheduler=SchedulerConfig(max_num_seqs=8, prefill_chunk=256, decoding_prefill_chunk=256),
    )
    engine = Engine(model, tokenizer, config)
    log = ShapeLog(engine.runner)
    engine.start()
    yield engine, log
    engine.shutdown()


def test_warm_up_runs_every_fresh_shape_before_serving_and_writes_no_block(bucketed: tuple[Engine, ShapeLog]) -> None:
    engine, log = bucketed
    prefix = template_prefix(engine.tokenizer)
    assert prefix > BS  # SmolLM2's template gives every chat its default system prompt
    expected = warm_shapes(8, 256, prefix, BS)
    assert log.shapes[: len(expected)] == expected and len(expected) > 40  # start() returned after all of them
    assert engine.pool.num_used == 0
    real_slots = engine.store.num_blocks * BS  # everything below the scratch block
    for pool in (*engine.store.keys, *engine.store.values):
        assert not mx.any(pool[:real_slots]).item()
    engine.check_integrity()


def test_bucketed_engine_matches_mlx_lm_and_a_burst_runs_only_warmed_shapes(
    bucketed: tuple[Engine, ShapeLog], smol: tuple[Any, Any]
) -> None:
    engine, log = bucketed
    tokenizer = smol[1]
    texts = ["Name three planets.", "What is the boiling point of water?", "Write a haiku about snow.", "Hi."]
    prompts = [chat_tokens(tokenizer, t) for t in texts]
    # one alone first: a single padded row (its padding after the real tokens, mlx-lm's causal mask)
    assert tokens_of(engine.generate(request(prompts[0], max_tokens=10))) == reference(smol, prompts[0], 10)
    log.shapes.clear()
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = tokens_of(engine.generate(request(prompts[i], max_tokens=10, salt=b"burst")))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    solo = [reference(smol, p, 10) for p in prompts]
    agree = sum(results[i] == solo[i] for i in range(len(prompts)))
    print(f"bucketed burst: {agree}/{len(prompts)} token-identical to solo mlx-lm runs; shapes {log.shapes}")
    assert agree >= len(prompts) - 1  # float32 sums over other batch shapes may differ in the last bits
    warmed = set(warm_shapes(8, 256, template_prefix(tokenizer), BS))
    assert log.shapes and all(shape in warmed for shape in log.shapes)
    assert engine.stats().prefill_shapes_built == 0  # none first run while serving (the /metrics counter)
    engine.check_integrity()


def test_a_resumed_turn_pads_its_key_width_and_matches_mlx_lm(
    bucketed: tuple[Engine, ShapeLog], smol: tuple[Any, Any]
) -> None:
    engine, log = bucketed
    tokenizer = smol[1]
    turn1 = chat_tokens(tokenizer, "Tell me about the moon.")
    first = tokens_of(engine.generate(request(turn1, max_tokens=6, conversation="bucketed")))
    turn2 = turn1 + first + chat_tokens(tokenizer, "And the sun?")[1:]
    log.shapes.clear()
    events = engine.generate(request(turn2, max_tokens=8, conversation="bucketed"))
    assert events[-1].cached_tokens > len(turn1)
    assert tokens_of(events) == reference(smol, turn2, 8)
    (shape,) = log.shapes
    assert shape.width > shape.tokens and shape.width == bucket(shape.width) and shape.tokens == bucket(shape.tokens)
    engine.check_integrity()


def test_bucketed_prefill_writes_the_same_kv_as_unpadded_prefill(smol: tuple[Any, Any]) -> None:
    """The same chunks (five fresh rows of similar lengths, padded to six rows, and rows resuming after context,
    their keys padded) prefilled with and without buckets leave the same K/V in every real slot."""
    model = smol[0]
    params = SamplingParams(max_tokens=1)
    lengths, resumed_at = [37, 40, 35, 38, 36, 120, 64], [0, 0, 0, 0, 0, 80, 31]
    stores = []
    for buckets in (False, True):
        store = KVStore.for_model(model, BS, 1.0, num_blocks=64)
        runner = ModelRunner(model, store, buckets)
        log = ShapeLog(runner)
        seqs, first = [], 0
        for i, n in enumerate(lengths):
            tokens = [(7 * i + 13 * j) % 40000 + 5 for j in range(n + 1)]
            seq = Sequence(f"s{i}", 0, tokens, params, None, None, 1)  # type: ignore[arg-type]
            blocks = -(-(n + 1) // BS)
            seq.block_ids, first = list(range(first, first + blocks)), first + blocks
            seqs.append(seq)
        context = [(s, start) for s, start in zip(seqs, resumed_at) if start]
        runner.prefill_rows(context)
        for seq, start in context:
            seq.num_computed_tokens = start
        log.shapes.clear()
        runner.prefill_rows([(s, n - start) for s, n, start in zip(seqs, lengths, resumed_at)])
        stores.append((store, seqs, log.shapes))
        if buckets:  # nothing ran at start-up here: every shape was a first use, counted once
            assert runner.shapes_built_serving == len(runner.shapes_run) >= len(set(log.shapes)) > 0
            assert set(log.shapes) <= runner.shapes_run
    (plain, seqs, exact), (padded, _, bucketed) = stores
    assert PrefillShape(5, 40, 40) in exact and PrefillShape(6, 48, 128) in bucketed  # padded rows, tokens
    assert any(s.width > s.tokens and s.width == bucket(s.width) for s in bucketed)  # resumed: padded keys
    worst = 0.0
    for seq, n in zip(seqs, lengths):
        slots = mx.array(slot_ids(seq.block_ids, 0, n, BS))
        for a, b in zip((*plain.keys, *plain.values), (*padded.keys, *padded.values)):
            want, got = np.array(a[slots].astype(mx.float32)), np.array(b[slots].astype(mx.float32))
            assert np.isfinite(got).all()
            worst = max(worst, float(np.abs(want - got).max() / (np.abs(want).max() + 1e-6)))
    print(f"largest relative K/V difference, bucketed against unpadded: {worst:.2e}")
    assert worst < 1e-3
