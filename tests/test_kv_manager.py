"""The life of a KV block, as a specification of KVCacheManager (no MLX: a fake storage holds token ids).

The fake storage keeps, per block, the token id each slot's KV was computed for, and per sequence a
"decode row" of computed tokens not yet in the pool, so every test can check that a sequence's blocks
hold exactly its tokens: the property the real engine's greedy outputs rest on.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence as Seq
from types import SimpleNamespace
from typing import Any, cast

import pytest

from server.engine.block_pool import BlockPool
from server.engine.kv_manager import KVCacheManager, common_prefix_length
from server.engine.sequence import Sequence, SequenceStatus

BS = 4


class FakeStorage:
    """KVStorage over Python lists: slot i of block b holds the token id whose KV it stores."""

    def __init__(self, num_blocks: int) -> None:
        self.slots: list[list[int | None]] = [[None] * BS for _ in range(num_blocks)]
        self.rows: dict[int, int] = {}  # id(seq) -> tokens of its KV in the pool (the rest only in its row)
        self.copies: list[tuple[int, int, int]] = []
        self.write_backs: list[list[int]] = []

    def copy_prefix(self, src_block: int, dst_block: int, num_slots: int) -> None:
        self.copies.append((src_block, dst_block, num_slots))
        self.slots[dst_block][:num_slots] = self.slots[src_block][:num_slots]

    def has_unwritten(self, seq: Sequence) -> bool:
        return id(seq) in self.rows and self.rows[id(seq)] < seq.num_computed_tokens

    def write_back(self, seqs: Seq[Sequence], counts: Seq[int]) -> None:
        self.write_backs.append(list(counts))
        for seq, count in zip(seqs, counts):
            self.write(seq, self.rows.get(id(seq), count), count)
            self.rows[id(seq)] = count

    def write(self, seq: Sequence, start: int, stop: int) -> None:
        for position in range(start, stop):
            self.slots[seq.block_ids[position // BS]][position % BS] = seq.token_at(position)

    def kv_of(self, seq: Sequence, num_tokens: int) -> list[int | None]:
        return [self.slots[seq.block_ids[p // BS]][p % BS] for p in range(num_tokens)]


def manager(num_blocks: int = 8, write_back_every: int = 4) -> tuple[KVCacheManager, FakeStorage]:
    storage = FakeStorage(num_blocks)
    return KVCacheManager(BlockPool(num_blocks, BS), storage, write_back_every), storage


def sequence(prompt: list[int], conversation: str | None = None, salt: bytes = b"") -> Sequence:
    params = SimpleNamespace(prompt_logprobs=None)  # the manager reads no sampling parameter
    return Sequence("r", 0, prompt, cast(Any, params), cast(Any, None), cast(Any, None), 64, salt, conversation)


def prefill(kv: KVCacheManager, storage: FakeStorage, seq: Sequence) -> None:
    """Compute every prompt token but the last straight into the pool, as a prefill does."""
    storage.write(seq, seq.num_computed_tokens, seq.num_tokens - 1)
    seq.num_computed_tokens = seq.num_tokens - 1
    kv.commit(seq)


def decode(kv: KVCacheManager, storage: FakeStorage, seq: Sequence, token: int) -> None:
    """One decode step: the fed token's KV goes to the sequence's row, a new token is sampled."""
    assert kv.grow(seq, seq.num_tokens)
    seq.status = SequenceStatus.RUNNING
    storage.rows.setdefault(id(seq), seq.num_computed_tokens)
    seq.num_computed_tokens += 1
    seq.output_token_ids.append(token)
    kv.sync([seq])


def finished_turn(
    kv: KVCacheManager,
    storage: FakeStorage,
    prompt: list[int],
    outputs: list[int],
    conversation: str | None = None,
    salt: bytes = b"",
) -> Sequence:
    seq = sequence(prompt, conversation, salt)
    assert kv.admit(seq)
    prefill(kv, storage, seq)
    for token in outputs:
        decode(kv, storage, seq, token)
    seq.status = SequenceStatus.FINISHED_STOPPED
    kv.finish(seq, completed=True)
    kv.sync([])
    return seq


def one_decoded_turn() -> tuple[KVCacheManager, FakeStorage, Sequence]:
    """A 6-token prompt of conversation "conv", prefilled, and one token decoded (still only in its decode row)."""
    kv, storage = manager(write_back_every=100)
    seq = sequence(list(range(6)), conversation="conv")
    kv.admit(seq)
    prefill(kv, storage, seq)
    decode(kv, storage, seq, 50)
    return kv, storage, seq


def test_the_manager_and_scheduler_import_no_mlx() -> None:
    code = (
        "import sys, server.engine.kv_manager, server.engine.scheduler; "
        "sys.exit(any(m == 'mlx' or m.startswith('mlx.') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_admission_reuses_full_cached_blocks_and_leaves_the_last_token() -> None:
    kv, storage = manager()
    first = sequence(list(range(9)))
    assert kv.admit(first) and first.num_computed_tokens == 0 and len(first.block_ids) == 3
    prefill(kv, storage, first)
    assert len(first.block_hashes) == 2  # 8 computed tokens: two full blocks hashed
    second = sequence(list(range(8)) + [99, 98])
    assert kv.admit(second)
    assert second.num_computed_tokens == 8 and second.block_ids[:2] == first.block_ids[:2]
    assert second.block_hashes == first.block_hashes  # the chain continues from the reused blocks
    assert [kv.pool.blocks[b].ref_count for b in second.block_ids] == [2, 2, 1]
    exact = sequence(list(range(8)))  # exactly two blocks: the last token must be computed for logits
    assert kv.admit(exact) and exact.num_computed_tokens == 4
    for seq in (first, second, exact):
        kv.finish(seq, completed=False)
    assert kv.pool.num_free == 8
    kv.check_integrity()


def test_a_prompt_logprobs_admission_reuses_nothing() -> None:
    kv, storage = manager()
    first = sequence(list(range(9)))
    kv.admit(first)
    prefill(kv, storage, first)
    again = sequence(list(range(9)))
    assert kv.admit(again, reuse_prefix=False) and again.num_computed_tokens == 0
    assert not set(again.block_ids) & set(first.block_ids)


def test_growth_allocates_only_across_a_block_boundary() -> None:
    kv, _ = manager()
    seq = sequence([1, 2, 3])
    kv.admit(seq)
    assert len(seq.block_ids) == 1 and kv.pool.num_used == 1
    assert kv.grow(seq, 4) and len(seq.block_ids) == 1  # still inside the first block
    assert kv.grow(seq, 5) and len(seq.block_ids) == 2
    assert kv.grow(seq, 8) and len(seq.block_ids) == 2
    assert kv.grow(seq, 9) and len(seq.block_ids) == 3
    assert kv.pool.num_used == 3
    kv.check_integrity()


def test_failed_admission_and_growth_hold_nothing_new() -> None:
    kv, _ = manager(num_blocks=3)
    mine = sequence(list(range(5)))
    assert kv.admit(mine) and kv.pool.num_free == 1
    too_big = sequence(list(range(100, 109)))
    assert not kv.admit(too_big) and too_big.block_ids == [] and kv.pool.num_free == 1
    assert not kv.grow(mine, 4 * BS) and len(mine.block_ids) == 2 and kv.pool.num_free == 1
    assert kv.can_ever_hold(3 * BS) and not kv.can_ever_hold(3 * BS + 1)
    kv.check_integrity()


def test_a_completed_turn_is_written_back_before_it_is_pinned_and_freed() -> None:
    kv, storage = manager(write_back_every=100)
    seq = sequence(list(range(6)), conversation="conv")
    kv.admit(seq)
    prefill(kv, storage, seq)
    for token in (50, 51, 52):
        decode(kv, storage, seq, token)
    assert storage.write_backs == [] and len(seq.block_hashes) == 1  # the decoded KV is only in the row
    seq.status = SequenceStatus.FINISHED_STOPPED
    kv.finish(seq, completed=True)
    assert "conv" not in kv.conversations and seq.block_ids  # settling: held until written back
    kv.sync([])
    assert storage.write_backs == [[8]]
    entry = kv.conversations["conv"]
    assert entry.token_ids == list(range(6)) + [50, 51] and len(entry.block_ids) == 2
    assert seq.block_ids == [] and kv.pool.num_used == kv.num_pinned_blocks == 2
    # the pinned chain is hashed: a request with the same 8 tokens and more hits both blocks by content
    other = sequence(list(range(6)) + [50, 51, 7])
    assert kv.admit(other) and other.num_computed_tokens == 8
    kv.check_integrity()


def test_periodic_write_back_hashes_generated_blocks() -> None:
    kv, storage = manager(write_back_every=2)
    seq = sequence([1, 2, 3])
    kv.admit(seq)
    prefill(kv, storage, seq)
    for token in (4, 5, 6, 7):
        decode(kv, storage, seq, token)
    assert storage.write_backs == [[4], [6]] and len(seq.block_hashes) == 1
    assert storage.kv_of(seq, 6) == [1, 2, 3, 4, 5, 6]


def test_an_aborted_turn_is_freed_at_once_and_never_pinned() -> None:
    kv, storage, seq = one_decoded_turn()
    kv.finish(seq, completed=False)
    assert not kv.conversations and kv.pool.num_free == 8 and storage.write_backs == []
    kv.check_integrity()


def test_the_next_turn_copies_the_pinned_partial_block_on_write() -> None:
    kv, storage = manager()
    turn1 = finished_turn(kv, storage, list(range(6)), [50], conversation="conv")
    pinned = list(kv.conversations["conv"].block_ids)  # 6 tokens of KV: a full block and a partial one
    assert kv.conversations["conv"].token_ids == list(range(6)) and len(pinned) == 2
    turn2 = sequence(turn1.token_ids + [60, 61], conversation="conv")
    assert kv.admit(turn2) and turn2.num_computed_tokens == 6
    assert turn2.block_ids[0] == pinned[0] and turn2.block_ids[1] not in pinned
    assert storage.copies == [(pinned[1], turn2.block_ids[1], 2)]
    assert storage.kv_of(turn2, 6) == list(range(6))
    # the new turn writes into its own copy; the pinned block keeps only turn 1's KV
    storage.write(turn2, 6, 7)
    assert storage.slots[pinned[1]][2] is None and storage.slots[turn2.block_ids[1]][2] == 50
    assert kv.pool.blocks[pinned[1]].ref_count == 1 and kv.pool.blocks[pinned[0]].ref_count == 2
    kv.finish(turn2, completed=False)
    kv.unpin_all()
    assert kv.pool.num_free == 8
    kv.check_integrity()


def test_an_edited_history_reuses_only_the_common_prefix() -> None:
    kv, storage = manager()
    turn1 = finished_turn(kv, storage, list(range(12)), [], conversation="c")
    edited = sequence(list(range(6)) + [77] * 6, conversation="c")
    assert kv.admit(edited)
    assert edited.num_computed_tokens == 6 == common_prefix_length(turn1.token_ids, edited.token_ids)
    assert storage.kv_of(edited, 6) == list(range(6))
    kv.finish(edited, completed=False)
    kv.check_integrity()


def test_preemption_frees_everything_and_resume_hits_the_written_back_prefix() -> None:
    kv, storage = manager(write_back_every=2)
    seq = sequence(list(range(7)))
    kv.admit(seq)
    prefill(kv, storage, seq)
    for token in (7, 8):  # KV of positions 0..7 in the pool after the second step's write-back
        decode(kv, storage, seq, token)
    assert len(seq.block_hashes) == 2 and len(seq.block_ids) == 2
    assert kv.grow(seq, seq.num_tokens + 1)  # a greedy step run one ahead reserved the next slot
    assert len(seq.block_ids) == 3
    kv.preempt(seq)
    assert seq.block_ids == [] and seq.block_hashes == [] and seq.num_computed_tokens == 0
    assert kv.pool.num_free == 8 and kv.pool.num_cached_free == 2  # freed blocks keep their hashes
    seq.status = SequenceStatus.PREEMPTED
    storage.rows.pop(id(seq))  # the engine drops a preempted sequence's decode row
    assert kv.admit(seq) and seq.num_computed_tokens == 8  # resume: both written-back blocks are hits
    assert storage.kv_of(seq, 8) == seq.token_ids[:8]
    kv.check_integrity()


def test_pressure_unpins_the_least_recently_used_idle_conversation() -> None:
    kv, storage = manager(num_blocks=6)
    finished_turn(kv, storage, list(range(5)), [9], conversation="old")  # 5 tokens of KV: 2 blocks pinned
    finished_turn(kv, storage, list(range(100, 105)), [9], conversation="new")
    assert kv.pool.num_used == 4 and kv.num_reclaimable == 6
    touched = sequence(list(range(5)) + [9], conversation="old")  # using "old" again makes "new" the LRU
    assert kv.admit(touched)
    kv.finish(touched, completed=False)
    big = sequence(list(range(200, 212)))  # needs 3 blocks: 2 free, then an idle pin goes
    assert kv.admit(big)
    assert set(kv.conversations) == {"old"}
    bigger = sequence(list(range(300, 320)))  # 5 blocks
    assert not kv.admit(bigger)  # only blocks held by running sequences remain: nothing is taken
    assert set(kv.conversations) == {"old"}
    kv.finish(big, completed=False)
    assert kv.admit(bigger) and not kv.conversations
    kv.check_integrity()


def test_tenant_salts_never_share_blocks() -> None:
    kv, storage = manager()
    finished_turn(kv, storage, list(range(9)), [], salt=b"tenant-a")
    same_tenant = sequence(list(range(9)), salt=b"tenant-a")
    other_tenant = sequence(list(range(9)), salt=b"tenant-b")
    assert kv.admit(same_tenant) and same_tenant.num_computed_tokens == 8
    assert kv.admit(other_tenant) and other_tenant.num_computed_tokens == 0
    assert not set(other_tenant.block_ids) & set(same_tenant.block_ids)
    assert other_tenant.block_hashes == []


def test_a_failed_step_frees_settling_turns_without_pinning_them() -> None:
    kv, storage, seq = one_decoded_turn()
    kv.finish(seq, completed=True)
    kv.abandon_unwritten()
    assert not kv.conversations and kv.pool.num_free == 8
    kv.sync([])
    assert storage.write_backs == []
    kv.check_integrity()


@pytest.mark.parametrize("completed", [True, False])
def test_finish_without_a_conversation_pins_nothing(completed: bool) -> None:
    kv, storage = manager()
    seq = sequence(list(range(6)))
    kv.admit(seq)
    prefill(kv, storage, seq)
    kv.finish(seq, completed)
    assert not kv.conversations and kv.pool.num_free == 8


def test_a_write_back_that_raises_leaves_the_settling_turns_for_abandon_to_free() -> None:
    kv, storage, seq = one_decoded_turn()
    kv.finish(seq, completed=True)

    def failing(seqs: Seq[Sequence], counts: Seq[int]) -> None:
        raise RuntimeError("device lost")

    storage.write_back = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        kv.sync([])
    kv.abandon_unwritten()
    assert not kv.conversations and kv.pool.num_free == 8
    kv.check_integrity()
