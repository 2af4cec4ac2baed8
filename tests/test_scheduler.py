"""Scheduler decisions on a real block pool, without MLX or a model: prefill budgets, decode batch, preemption."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from types import SimpleNamespace
from typing import Any, cast

import pytest

from server.engine.block_pool import BlockPool
from server.engine.config import SchedulerConfig
from server.engine.kv_manager import KVCacheManager
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, SequenceStatus

BS = 16


class NoStorage:
    """KVStorage for scheduling alone: no KV bytes, no decode rows."""

    def copy_prefix(self, src_block: int, dst_block: int, num_slots: int) -> None:
        pass

    def has_unwritten(self, seq: Sequence) -> bool:
        return False

    def write_back(self, seqs: Seq[Sequence], counts: Seq[int]) -> None:
        pass


def scheduler(config: SchedulerConfig, num_blocks: int = 64) -> Scheduler:
    return Scheduler(KVCacheManager(BlockPool(num_blocks, BS), NoStorage()), config)


def sequence(name: str, prompt_len: int, first: int) -> Sequence:
    prompt = list(range(first, first + prompt_len))
    # the scheduler reads no sampling parameter but prompt_logprobs, and never text
    params = SimpleNamespace(prompt_logprobs=None)
    return Sequence(name, 0, prompt, cast(Any, params), cast(Any, None), cast(Any, None), 8)


def one_decoding_one_waiting(sched: Scheduler) -> tuple[Sequence, Sequence]:
    """A short request admitted and prefilled (so it decodes), then a 70-token one waiting."""
    decoder, waiting = sequence("a", 10, 1000), sequence("b", 70, 2000)
    sched.add(decoder)
    sched.schedule()
    decoder.num_computed_tokens = 10
    sched.add(waiting)
    return decoder, waiting


def test_prompts_take_the_full_budget_until_something_decodes_then_the_decoding_budget() -> None:
    sched = scheduler(SchedulerConfig(prefill_chunk=100, decoding_prefill_chunk=20))
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
    sched = scheduler(SchedulerConfig(prefill_chunk=100, decoding_prefill_chunk=20))
    decoder, waiting = one_decoding_one_waiting(sched)
    assert sched.schedule().prefills == [(waiting, 20)]
    waiting.num_computed_tokens += 20
    sched.remove(decoder)
    assert sched.schedule().prefills == [(waiting, 49)]


def test_the_decoding_budget_defaults_and_validation() -> None:

    from server.engine.config import (
        DEFAULT_DECODING_PREFILL_CHUNK,
        DEFAULT_PREFILL_CHUNK,
        EngineConfig,
        resolved_config,
    )

    with pytest.raises(ValueError):
        SchedulerConfig(decoding_prefill_chunk=0)
    sched = scheduler(SchedulerConfig())  # unset budgets: the CPU defaults
    long = sequence("a", 600, 1)
    sched.add(long)
    assert sched.schedule().prefills == [(long, 512)]
    # the engine fills in the device's defaults, never letting the decoding budget exceed the other
    resolved = resolved_config(EngineConfig(scheduler=SchedulerConfig(prefill_chunk=32)), on_gpu=False).scheduler
    assert (resolved.prefill_chunk, resolved.decoding_prefill_chunk) == (32, 32)
    for on_gpu, device in ((False, "cpu"), (True, "gpu")):
        resolved = resolved_config(EngineConfig(), on_gpu=on_gpu).scheduler
        assert resolved.prefill_chunk == DEFAULT_PREFILL_CHUNK[device]
        assert resolved.decoding_prefill_chunk == DEFAULT_DECODING_PREFILL_CHUNK[device]


def test_the_decoding_budget_never_exceeds_the_full_one_even_unresolved() -> None:
    sched = scheduler(SchedulerConfig(prefill_chunk=16))  # the decoding budget left to the CPU default (64)
    decoder, waiting = one_decoding_one_waiting(sched)
    assert sched.schedule().prefills == [(waiting, 16)]


def test_only_streamed_decoders_hold_prompts_to_the_decoding_budget() -> None:
    """A non-streamed request shows nothing until it ends: while only such requests decode, waiting
    prompts get the full budget (a batch job's burst starts together); one streamed decoder brings the
    decoding budget back."""
    sched = scheduler(SchedulerConfig(prefill_chunk=100, decoding_prefill_chunk=20))
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


def decoded(*seqs: Sequence) -> None:
    """What the engine does after a step that prefilled and decoded seqs: one new token each."""
    for seq in seqs:
        seq.num_computed_tokens = seq.num_tokens
        seq.output_token_ids.append(7)


def test_a_decode_needing_a_block_preempts_the_newest_sequence_which_resumes_first() -> None:
    sched = scheduler(SchedulerConfig(prefill_chunk=100), num_blocks=2)
    older, newer, late = sequence("a", 16, 1000), sequence("b", 16, 2000), sequence("c", 4, 3000)
    sched.add(older)
    sched.add(newer)
    plan = sched.schedule()
    assert plan.prefills == [(older, 15), (newer, 15)] and plan.decodes == [older, newer]
    decoded(older, newer)  # 17 tokens each: the next decode needs a second block
    sched.add(late)
    plan = sched.schedule()
    assert plan.decodes == [older] and not plan.failed
    assert newer.status is SequenceStatus.PREEMPTED and newer.block_ids == [] and newer.num_computed_tokens == 0
    assert list(sched.waiting) == [newer, late]  # first in line again, before later arrivals
    assert len(older.block_ids) == 2
    sched.remove(older)
    plan = sched.schedule()  # resumed: its prompt and its generated token are computed again
    assert sched.running[0] is newer and newer.status is SequenceStatus.RUNNING
    assert plan.prefills[0] == (newer, 16) and newer.output_token_ids == [7]
    sched.kv.check_integrity()


def two_decoding_sequences() -> tuple[Scheduler, Sequence, Sequence]:
    """Two 16-token prompts admitted and prefilled into a 3-block pool: one block left for both to grow into."""
    sched = scheduler(SchedulerConfig(prefill_chunk=100), num_blocks=3)
    older, newer = sequence("a", 16, 1000), sequence("b", 16, 2000)
    sched.add(older)
    sched.add(newer)
    sched.schedule()
    decoded(older, newer)
    return sched, older, newer


def test_preemption_frees_a_block_reserved_for_the_step_run_ahead() -> None:
    sched, older, newer = two_decoding_sequences()
    assert sched.kv.grow(newer, newer.num_tokens + 1)  # the decoder reserved the newer one's next slot early
    assert not sched.kv.grow(older, older.num_tokens + 1)  # and found none for the older: no step ahead
    plan = sched.schedule()
    assert plan.decodes == [older] and newer.status is SequenceStatus.PREEMPTED
    assert newer.block_ids == [] and sched.kv.pool.num_free == 1
    sched.kv.check_integrity()


def test_a_sequence_that_cannot_fit_even_alone_fails_instead_of_waiting() -> None:
    sched = scheduler(SchedulerConfig(prefill_chunk=100), num_blocks=1)
    alone = sequence("a", 15, 1000)
    sched.add(alone)
    sched.schedule()
    decoded(alone)
    assert sched.schedule().decodes == [alone]  # 16 tokens: the one block still holds them
    decoded(alone)
    plan = sched.schedule()
    assert plan.failed == [alone] and alone.error_kind == "pool_exhausted" and not sched.running
    too_long = sequence("b", 16, 2000)  # 17 tokens of KV needed: more than the whole pool
    sched.add(too_long)
    plan = sched.schedule()
    assert plan.failed == [too_long] and "whole pool holds 16" in (too_long.error or "")


def test_the_newest_sequence_needing_a_block_waits_when_every_older_one_already_decodes() -> None:
    """The older sequence took the pool's last block a step early (its step ran ahead): the newer one, needing a
    block while the older already decodes this step, is preempted and resumes later rather than failing."""
    sched, older, newer = two_decoding_sequences()
    assert sched.kv.grow(older, older.num_tokens + 1)
    plan = sched.schedule()
    assert plan.decodes == [older] and not plan.failed
    assert newer.status is SequenceStatus.PREEMPTED and list(sched.waiting) == [newer]
    sched.remove(older)
    sched.schedule()
    assert sched.running == [newer]
    sched.kv.check_integrity()
