"""Continuous batching: who joins the batch, who prefills how much, who decodes, who is preempted.

Each step the scheduler admits waiting sequences while their blocks fit, gives
prefill chunks to admitted sequences within a token budget, a smaller one while
streamed sequences decode (so prompts never hold back a streamed token for more
than one small chunk, and a new request's first token comes a step or two after
it arrives; non-streamed requests show nothing until they end, so a burst of
them starts together under the full budget), and puts every sequence whose
prompt is computed into the decode batch. When a decode needs a block and none can be reclaimed, the newest
running sequence is preempted: its blocks are freed (their hashes stay, so
re-admission mostly hits the prefix cache) and it waits at the head of the
queue. A new sequence whose prompt shares whole blocks that a running sequence
is still prefilling waits until they are computed, then reuses them (one
computation of a shared system prompt, however many requests arrive with it at
once).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from server.engine.block_pool import PoolExhaustedError
from server.engine.config import DEFAULT_DECODING_PREFILL_BUDGET, DEFAULT_PREFILL_BUDGET, SchedulerConfig
from server.engine.kv_manager import KVCacheManager, PrefixHit, common_prefix_length
from server.engine.paged_cache import KVStore
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

    def __init__(self, kv: KVCacheManager, store: KVStore, config: SchedulerConfig) -> None:
        self.kv = kv
        self.store = store
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.block_ids)
        seq.block_hashes.clear()

    # -- admission ------------------------------------------------------------------------------
    def _blocked_by_sibling(self, seq: Sequence) -> bool:
        """Siblings of an n > 1 request wait until sequence 0 has computed the shared prompt."""
        if seq.index == 0:
            return False
        return any(s.request_id == seq.request_id and s.index == 0 and s.num_pending_prefill > 0
                   for s in (*self.running, *self.waiting))

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
            if other.token_ids[other.num_computed_tokens:limit] == seq.token_ids[other.num_computed_tokens:limit] \
                    and other.token_ids[:other.num_computed_tokens] == seq.token_ids[:other.num_computed_tokens]:
                return True
            shared = common_prefix_length(other.token_ids[:limit], seq.token_ids[:limit]) // bs * bs
            if shared - other.num_computed_tokens >= bs:
                return True
        return False

    def _admit(self, seq: Sequence) -> bool:
        if seq.params.prompt_logprobs is not None and seq.index == 0 and not seq.admitted_once:
            hit = PrefixHit()  # every prompt token's logits are needed: compute them all
        else:
            hit = self.kv.match(seq.token_ids, seq.salt, seq.conversation_key)
        held = len(hit.block_ids)
        needed = self.kv.blocks_needed(held, seq.num_tokens)
        pool = self.kv.pool
        if needed > self.kv.num_reclaimable:
            self.kv.free(hit.block_ids)
            if hit.copy_from is not None:
                pool.release(hit.copy_from)
            return False
        blocks = hit.block_ids
        if hit.copy_from is not None:
            self.kv.allocate(blocks, (held + 1) * self.kv.block_size)
            self.store.copy_slots(hit.copy_from, blocks[-1], hit.num_tokens % self.kv.block_size)
            pool.release(hit.copy_from)
        self.kv.allocate(blocks, seq.num_tokens)
        seq.block_ids = blocks
        seq.num_computed_tokens = hit.num_tokens
        if not seq.admitted_once:
            seq.num_cached_tokens = hit.num_tokens
            seq.admitted_once = True
        # full reused blocks are already hashed; record their hashes so the chain continues
        self.kv.commit(seq.token_ids, seq.block_ids, seq.block_hashes, seq.num_computed_tokens, seq.salt)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    def _admit_waiting(self, plan: StepPlan) -> None:
        now = time.monotonic()
        total = self.kv.pool.num_blocks
        for seq in list(self.waiting):
            if len(self.running) >= self.config.max_num_seqs:
                break
            if self._blocked_by_sibling(seq) or self._prefix_in_flight(seq):
                continue
            if self.kv.blocks_needed(0, seq.num_tokens + 1) > total:
                seq.error = (f"the request needs {seq.num_tokens + 1} tokens of KV but the whole pool holds "
                             f"{total * self.kv.block_size}")
                seq.error_kind = "pool_exhausted"
                self.waiting.remove(seq)
                plan.failed.append(seq)
                continue
            if self._admit(seq):
                self.waiting.remove(seq)
                continue
            if now - seq.arrival > self.config.admission_timeout:
                seq.error = f"no KV blocks freed up within {self.config.admission_timeout:.0f}s"
                seq.error_kind = "pool_exhausted"
                self.waiting.remove(seq)
                plan.failed.append(seq)
                continue
            break  # first come, first served: later requests do not overtake one waiting for blocks

    # -- the step -------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.block_ids)
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)

    def _reserve_decode_slot(self, seq: Sequence, plan: StepPlan) -> bool:
        """Make sure seq has a block for the token it feeds; preempt newer sequences if needed."""
        if seq.num_tokens <= len(seq.block_ids) * self.kv.block_size:
            return True  # the usual case, checked without the allocator
        while True:
            try:
                self.kv.allocate(seq.block_ids, seq.num_tokens)
                return True
            except PoolExhaustedError:
                victims = [s for s in self.running if s is not seq and s not in plan.decodes]
                if not victims:
                    seq.error = "the KV pool cannot hold this sequence's context"
                    seq.error_kind = "pool_exhausted"
                    self.running.remove(seq)
                    plan.failed.append(seq)
                    return False
                self._preempt(victims[-1])

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._admit_waiting(plan)
        # while a streamed sequence decodes, its client waits for the step's token: the smaller budget bounds
        # that wait. Non-streamed sequences show nothing until they end: for them (a batch job's burst of
        # requests) the full budget admits everyone sooner and the batch finishes together.
        config = self.config
        budget = config.prefill_budget or DEFAULT_PREFILL_BUDGET["cpu"]
        if any(seq.streamed and not seq.num_pending_prefill for seq in self.running):
            budget = min(budget, config.decoding_prefill_budget or DEFAULT_DECODING_PREFILL_BUDGET["cpu"])
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
