"""Scheduler decisions on a real pool and KV store, without a model: prefill budgets, decode batch."""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
import pytest

from server.engine.block_pool import BlockPool
from server.engine.config import (DEFAULT_DECODING_PREFILL_BUDGET, DEFAULT_PREFILL_BUDGET, EngineConfig,
                                  SchedulerConfig)
from server.engine.engine import _resolved
from server.engine.kv_manager import KVCacheManager
from server.engine.paged_cache import KVShape, KVStore
from server.engine.sampling import SamplingParams, SequenceSampler
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence

BS = 16


def scheduler(config: SchedulerConfig) -> Scheduler:
    pool = BlockPool(64, BS)
    store = KVStore(KVShape(1, (1,), (4,), (4,), mx.float32), 64, BS)
    return Scheduler(KVCacheManager(pool), store, config)


def sequence(name: str, prompt_len: int, first: int) -> Sequence:
    prompt = list(range(first, first + prompt_len))
    params = SamplingParams(max_tokens=8)
    # the scheduler never reads text: no detokenizer needed
    return Sequence(name, 0, prompt, params, SequenceSampler(params, prompt, None), cast(Any, None), 8)


def one_decoding_one_waiting(sched: Scheduler) -> tuple[Sequence, Sequence]:
    """A short request admitted and prefilled (so it decodes), then a 70-token one waiting."""
    decoder, waiting = sequence("a", 10, 1000), sequence("b", 70, 2000)
    sched.add(decoder)
    sched.schedule()
    decoder.num_computed_tokens = 10
    sched.add(waiting)
    return decoder, waiting


def test_prompts_take_the_full_budget_until_something_decodes_then_the_decoding_budget() -> None:
    sched = scheduler(SchedulerConfig(prefill_budget=100, decoding_prefill_budget=20))
    first = sequence("a", 90, 1000)
    sched.add(first)
    plan = sched.schedule()
    # nothing decodes: one step takes all 89 tokens (the last prompt token is fed by the first decode)
    assert plan.prefills == [(first, 89)] and plan.decodes == [first]
    first.num_computed_tokens += 89 + 1
    first.output_token_ids.append(7)

    second, third = sequence("b", 50, 2000), sequence("c", 50, 3000)
    sched.add(second)
    sched.add(third)
    plan = sched.schedule()
    # "a" decodes, so the step's prompt tokens are bounded by the decoding budget, first come first served
    assert plan.prefills == [(second, 20)] and plan.decodes == [first]
    second.num_computed_tokens += 20
    plan = sched.schedule()
    assert plan.prefills == [(second, 20)] and plan.decodes == [first]


def test_the_full_budget_returns_when_the_last_decoder_finishes() -> None:
    sched = scheduler(SchedulerConfig(prefill_budget=100, decoding_prefill_budget=20))
    decoder, waiting = one_decoding_one_waiting(sched)
    assert sched.schedule().prefills == [(waiting, 20)]
    waiting.num_computed_tokens += 20
    sched.remove(decoder)
    assert sched.schedule().prefills == [(waiting, 49)]


def test_the_decoding_budget_defaults_and_validation() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(decoding_prefill_budget=0)
    sched = scheduler(SchedulerConfig())  # unset budgets: the CPU defaults
    long = sequence("a", 600, 1)
    sched.add(long)
    assert sched.schedule().prefills == [(long, 512)]
    # the engine fills in the device's defaults, never letting the decoding budget exceed the other
    resolved = _resolved(EngineConfig(scheduler=SchedulerConfig(prefill_budget=32))).scheduler
    assert (resolved.prefill_budget, resolved.decoding_prefill_budget) == (32, 32)
    resolved = _resolved(EngineConfig()).scheduler
    device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    assert resolved.prefill_budget == DEFAULT_PREFILL_BUDGET[device]
    assert resolved.decoding_prefill_budget == DEFAULT_DECODING_PREFILL_BUDGET[device]


def test_the_decoding_budget_never_exceeds_the_full_one_even_unresolved() -> None:
    sched = scheduler(SchedulerConfig(prefill_budget=16))  # the decoding budget left to the CPU default (64)
    decoder, waiting = one_decoding_one_waiting(sched)
    assert sched.schedule().prefills == [(waiting, 16)]


def test_only_streamed_decoders_hold_prompts_to_the_decoding_budget() -> None:
    """A non-streamed request shows nothing until it ends: while only such requests decode, waiting
    prompts get the full budget (a batch job's burst starts together); one streamed decoder brings the
    decoding budget back."""
    sched = scheduler(SchedulerConfig(prefill_budget=100, decoding_prefill_budget=20))
    decoder, waiting = one_decoding_one_waiting(sched)
    decoder.streamed = False
    plan = sched.schedule()
    assert plan.prefills == [(waiting, 69)] and plan.decodes == [decoder, waiting]
    waiting.num_computed_tokens += 69 + 1
    streamed, late = sequence("s", 10, 3000), sequence("l", 60, 4000)
    sched.add(streamed)
    sched.schedule()
    streamed.num_computed_tokens = 10  # decoding now, and streamed (the default)
    sched.add(late)
    assert sched.schedule().prefills == [(late, 20)]
