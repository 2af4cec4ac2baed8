"""Continuous batching: who joins the batch, who prefills how much, who decodes, who is preempted.

Each step the scheduler admits waiting sequences while their blocks fit, gives
prefill chunks to admitted sequences within a token budget, a smaller one while
streamed sequences decode (so prompts never hold back a streamed token for more
than one small chunk, and a new request's first token comes a step or two after
it arrives; non-streamed requests show nothing until they end, so a burst of
them starts together under the full budget), and puts every sequence whose
prompt is computed into the decode batch. When a decode needs a block and
none can be reclaimed, the newest running sequence not yet decoding this step
(else the one in need) is preempted: the KV manager frees its blocks (their
hashes stay, so re-admission mostly hits the prefix cache) and it waits at the
head of the queue. A new sequence whose prompt shares whole blocks that a running sequence
is still prefilling waits until they are computed, then reuses them (one
computation of a shared system prompt, however many requests arrive with it at
once).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from server.engine.config import (
    DEFAULT_DECODING_PREFILL_CHUNK,
    DEFAULT_PREFILL_CHUNK,
    SchedulerConfig,
)
from server.engine.kv_manager import KVCacheManager, common_prefix_length
from server.engine.sequence import Sequence, SequenceStatus


@dataclass
class StepPlan:
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # could not get blocks: finish with an error

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.decodes or self.failed)


class Scheduler:
    """Owns the waiting queue and the running batch; decides each step's work."""

    def __init__(self, kv: KVCacheManager, config: SchedulerConfig) -> None:
        self.kv = kv
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence, completed: bool = False) -> None:
        """Take a finished sequence out of the queues; its blocks go back through the KV manager (a
        completed one's KV is kept: hashed, and pinned under its conversation key)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.finish(seq, completed)

    # -- admission ------------------------------------------------------------------------------
    def _blocked_by_sibling(self, seq: Sequence) -> bool:
        """Siblings of an n > 1 request wait until sequence 0 has computed the shared prompt."""
        if seq.index == 0:
            return False
        return any(
            s.request_id == seq.request_id and s.index == 0 and s.num_pending_prefill > 0
            for s in (*self.running, *self.waiting)
        )

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """A running sequence is still computing prompt blocks this new one shares (many agents arriving
        together with one system prompt): wait for them, then reuse them from the cache, rather than
        compute the same blocks once per arrival."""
        if seq.admitted_once:
            return False
        bs = self.kv.block_size
        for other in self.running:
            if other.num_pending_prefill == 0 or other.salt != seq.salt:
                continue
            limit = min(len(other.token_ids), len(seq.token_ids) - 1) // bs * bs  # whole blocks only
            if limit - other.num_computed_tokens < bs:
                continue
            if (
                other.token_ids[other.num_computed_tokens : limit] == seq.token_ids[other.num_computed_tokens : limit]
                and other.token_ids[: other.num_computed_tokens] == seq.token_ids[: other.num_computed_tokens]
            ):
                return True
            shared = common_prefix_length(other.token_ids[:limit], seq.token_ids[:limit]) // bs * bs
            if shared - other.num_computed_tokens >= bs:
                return True
        return False

    def _admit(self, seq: Sequence) -> bool:
        # a first prompt_logprobs admission needs every prompt token's logits: it computes them all
        reuse = seq.params.prompt_logprobs is None or seq.index != 0 or seq.admitted_once
        if not self.kv.admit(seq, reuse_prefix=reuse):
            return False
        if not seq.admitted_once:
            seq.num_cached_tokens = seq.num_computed_tokens
            seq.admitted_once = True
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    def _admit_waiting(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for seq in list(self.waiting):
            if len(self.running) >= self.config.max_num_seqs:
                break
            if self._blocked_by_sibling(seq) or self._prefix_in_flight(seq):
                continue
            if not self.kv.can_ever_hold(seq.num_tokens + 1):
                seq.error = (
                    f"the request needs {seq.num_tokens + 1} tokens of KV but the whole pool holds "
                    f"{self.kv.capacity_tokens}"
                )
                seq.error_kind = "pool_exhausted"
                self.waiting.remove(seq)
                plan.failed.append(seq)
                continue
            if self._admit(seq):
                self.waiting.remove(seq)
                continue
            if now - seq.arrival > self.config.queue_timeout:
                seq.error = f"no KV blocks freed up within {self.config.queue_timeout:.0f}s"
                seq.error_kind = "pool_exhausted"
                self.waiting.remove(seq)
                plan.failed.append(seq)
                continue
            break  # first come, first served: later requests do not overtake one waiting for blocks

    # -- the step -------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.preempt(seq)
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)

    def _reserve_decode_slot(self, seq: Sequence, plan: StepPlan) -> bool:
        """Make sure seq has a block for the token it feeds; preempt the newest sequence not decoding this
        step if needed, or seq itself when every other one already decodes (it waits for their blocks)."""
        while not self.kv.grow(seq, seq.num_tokens):
            victims = [s for s in self.running if s is not seq and s not in plan.decodes]
            if victims:
                self._preempt(victims[-1])
            elif len(self.running) > 1:
                self._preempt(seq)
                return False
            else:  # alone, with every idle pin unpinned: the pool cannot hold it
                seq.error = "the KV pool cannot hold this sequence's context"
                seq.error_kind = "pool_exhausted"
                self.running.remove(seq)
                plan.failed.append(seq)
                return False
        return True

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._admit_waiting(plan)
        # while a streamed sequence decodes, its client waits for the step's token: the smaller budget bounds
        # that wait. Non-streamed sequences show nothing until they end: for them (a batch job's burst of
        # requests) the full budget admits everyone sooner and the batch finishes together.
        config = self.config
        budget = config.prefill_chunk or DEFAULT_PREFILL_CHUNK["cpu"]
        if any(seq.streamed and not seq.num_pending_prefill for seq in self.running):
            budget = min(budget, config.decoding_prefill_chunk or DEFAULT_DECODING_PREFILL_CHUNK["cpu"])
        chunked: dict[int, int] = {}
        for seq in self.running:
            pending = seq.num_pending_prefill
            if pending and budget:
                take = min(pending, budget)
                plan.prefills.append((seq, take))
                chunked[id(seq)] = take
                budget -= take
        for seq in list(self.running):
            # a sequence preempted by an earlier one's reservation is no longer RUNNING
            if seq.num_pending_prefill - chunked.get(id(seq), 0) == 0 and seq.status is SequenceStatus.RUNNING:
                if self._reserve_decode_slot(seq, plan):
                    plan.decodes.append(seq)
        plan.prefills = [(s, n) for s, n in plan.prefills if s in self.running]
        return plan
