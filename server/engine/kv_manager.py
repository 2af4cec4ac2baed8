"""The one owner of KV blocks: every sequence's blocks from admission to finish, and conversation pins.

The scheduler decides who runs and talks to this manager in sequence-level
verbs only; the pool's ref counts and the KV bytes stay behind it. A block's
life, as the verbs see it:

    admit(seq)    match the longest reusable prefix (content hash, or the
                  conversation's pin with copy-on-write of its partial block),
                  allocate the rest; nothing held if it does not fit
    grow(seq, n)  blocks for n tokens (a decode slot, a step run ahead),
                  unpinning idle conversations (LRU) when the pool is dry
    commit(seq)   hash every block whose KV is computed and in the pool
    preempt(seq)  free everything (hashes stay: re-admission mostly hits)
    finish(seq)   completed: written back, hashed, pinned under its
                  conversation key, freed; otherwise freed at once
    sync(decodes) after a decode step: write decode rows back to the pool
                  every WRITE_BACK_EVERY steps and for finished sequences

Two ways to reuse computed KV:

- content: full blocks whose chained hash matches (shared system prompts,
  forks, another conversation with the same prefix under the same salt);
- conversation: the pin a finished turn leaves under its conversation key
  keeps its blocks resident, including the partial last block, so the next
  turn recomputes nothing it already has. The partial block is copied
  (copy-on-write) because the old turn's tokens after the divergence point
  must not be overwritten in a block someone else may still read.

The KV bytes are reached through `KVStorage` (the model runner in the engine,
a fake in the tests), so this module imports no MLX.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.block_pool import (
    BlockPool,
    PoolExhaustedError,
    chain_hash,
    prefix_hashes,
)
from server.engine.sequence import Sequence, SequenceStatus

# decode rows are written back to the pool every this many steps (and when a sequence finishes); a
# block is hashed for reuse once written back, so this bounds how late a generated block becomes shareable
WRITE_BACK_EVERY = 16


class KVStorage(Protocol):
    """What the manager asks of the place the KV bytes live."""

    def copy_prefix(self, src_block: int, dst_block: int, num_slots: int) -> None:
        """Copy the first num_slots token slots of src_block into dst_block (copy-on-write)."""

    def has_unwritten(self, seq: Sequence) -> bool:
        """Whether some of seq's computed KV lives outside its blocks (a decode row) so far."""

    def write_back(self, seqs: Seq[Sequence], counts: Seq[int]) -> None:
        """Make the first counts[i] tokens of seqs[i]'s KV present in its blocks."""


@dataclass
class PrefixHit:
    """Reused KV for a new sequence: held full blocks, and a partial block to copy from."""

    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    copy_from: int | None = None  # held; its first num_tokens % block_size slots are reused


@dataclass
class ConversationEntry:
    token_ids: list[int]
    block_ids: list[int]  # one reference held on each


def common_prefix_length(a: Seq[int], b: Seq[int]) -> int:
    limit = min(len(a), len(b))
    for i in range(limit):
        if a[i] != b[i]:
            return i
    return limit


class KVCacheManager:
    """Block bookkeeping for sequences on top of one BlockPool, with storage operations through KVStorage."""

    def __init__(self, pool: BlockPool, storage: KVStorage, write_back_every: int = WRITE_BACK_EVERY) -> None:
        self.pool = pool
        self.storage = storage
        self.block_size = pool.block_size
        self.write_back_every = write_back_every
        self.conversations: OrderedDict[str, ConversationEntry] = OrderedDict()
        self._settling: list[Sequence] = []  # finished, completed; pinned and freed once written back
        self._steps_since_write_back = 0
        self.num_preemptions = 0  # sequences whose blocks were taken back to make room (tests, logs)

    # -- capacity -----------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def can_ever_hold(self, num_tokens: int) -> bool:
        """Whether the whole pool, emptied, holds num_tokens of KV."""
        return self._blocks_needed(0, num_tokens) <= self.pool.num_blocks

    @property
    def num_reclaimable(self) -> int:
        """Blocks that could be handed out now: free ones plus those only pins hold."""
        pinned_only = {
            b for e in self.conversations.values() for b in e.block_ids if self.pool.blocks[b].ref_count == 1
        }
        return self.pool.num_free + len(pinned_only)

    @property
    def num_pinned_blocks(self) -> int:
        return len({b for e in self.conversations.values() for b in e.block_ids})

    # -- a sequence's blocks ------------------------------------------------------------------
    def admit(self, seq: Sequence, reuse_prefix: bool = True) -> bool:
        """Give seq blocks for all its tokens, reusing the longest cached prefix when `reuse_prefix`.

        Sets seq.block_ids, seq.num_computed_tokens (the reused tokens) and the hashes of the reused
        full blocks. Returns False, holding nothing, when the blocks do not fit.
        """
        hit = self.match(seq.token_ids, seq.salt, seq.conversation_key) if reuse_prefix else PrefixHit()
        held = len(hit.block_ids)
        if self._blocks_needed(held, seq.num_tokens) > self.num_reclaimable:
            self._drop_hit(hit)
            return False
        blocks = hit.block_ids
        if hit.copy_from is not None:
            self._allocate(blocks, (held + 1) * self.block_size)
            self.storage.copy_prefix(hit.copy_from, blocks[-1], hit.num_tokens % self.block_size)
            self.pool.release(hit.copy_from)
        self._allocate(blocks, seq.num_tokens)
        seq.block_ids = blocks
        seq.num_computed_tokens = hit.num_tokens
        self.commit(seq)  # full reused blocks are already hashed; record their hashes so the chain continues
        return True

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's blocks hold num_tokens, unpinning idle conversations (LRU) when the pool is dry.

        Returns False, with seq's blocks unchanged, if the pool cannot give them.
        """
        if num_tokens <= len(seq.block_ids) * self.block_size:
            return True  # the usual case, decided without the allocator
        try:
            self._allocate(seq.block_ids, num_tokens)
        except PoolExhaustedError:
            return False
        return True

    def commit(self, seq: Sequence) -> None:
        """Hash every block of seq that became full (its KV computed and in the pool) so others can reuse it."""
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        while (len(hashes) + 1) * bs <= seq.num_computed_tokens:
            i = len(hashes)
            block_hash = chain_hash(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs], seq.salt)
            self.pool.commit(seq.block_ids[i], block_hash)
            hashes.append(block_hash)

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks to make room; it computes its KV again (mostly prefix hits) when re-admitted."""
        self._free(seq)
        seq.num_computed_tokens = 0
        self.num_preemptions += 1

    def finish(self, seq: Sequence, completed: bool) -> None:
        """Give back a finished sequence's blocks.

        A completed turn (stopped or at its length) keeps its KV: once written back (see `sync`) its full
        blocks are hashed and, with a conversation key, pinned; an aborted or failed one is freed at once.
        """
        if completed and self.storage.has_unwritten(seq):
            self._settling.append(seq)
        else:
            self._release(seq, completed)

    def sync(self, decodes: Seq[Sequence]) -> None:
        """After a decode step: write rows back every `write_back_every` steps, and finished sequences'
        at once (one batch per step); then hash the blocks that are full and release the finished ones."""
        self._steps_since_write_back += 1
        settling = self._settling
        periodic = self._steps_since_write_back >= self.write_back_every
        if not periodic and not settling:
            return
        seqs = settling + ([s for s in decodes if s.status is SequenceStatus.RUNNING] if periodic else [])
        self.storage.write_back(seqs, [s.num_computed_tokens for s in seqs])
        self._settling = []  # only now: if the write-back raised, abandon_unwritten still frees them
        if periodic:
            self._steps_since_write_back = 0
        for seq in seqs:
            self.commit(seq)
        for seq in settling:
            self._release(seq, completed=True)

    def abandon_unwritten(self) -> None:
        """Free finished sequences still waiting for write-back (a failed step: their KV may be incomplete)."""
        settling, self._settling = self._settling, []
        for seq in settling:
            self._release(seq, completed=False)

    def _release(self, seq: Sequence, completed: bool) -> None:
        if completed and seq.conversation_key:
            self.pin(seq.conversation_key, seq.token_ids[: seq.num_computed_tokens], seq.block_ids)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.pool.release_all(seq.block_ids)
        seq.block_ids.clear()
        seq.block_hashes.clear()

    # -- reuse --------------------------------------------------------------------------------
    def match(self, token_ids: Seq[int], salt: bytes, conversation_key: str | None) -> PrefixHit:
        """Find and hold the longest reusable prefix; at least the last token is left to compute."""
        cap = len(token_ids) - 1
        bs = self.block_size
        full = self.pool.match(prefix_hashes(token_ids[:cap], bs, salt))
        hit = PrefixHit(block_ids=list(full), num_tokens=len(full) * bs)
        entry = self.conversations.get(conversation_key) if conversation_key else None
        if entry is not None and conversation_key is not None:  # an entry is found only by a key
            self.conversations.move_to_end(conversation_key)
            shared = min(common_prefix_length(entry.token_ids, token_ids), cap)
            if shared > hit.num_tokens:
                n_full = shared // bs
                hit = PrefixHit(block_ids=entry.block_ids[:n_full], num_tokens=shared)
                if shared % bs:
                    hit.copy_from = entry.block_ids[n_full]
        for block_id in hit.block_ids:
            self.pool.acquire(block_id)
        if hit.copy_from is not None:
            self.pool.acquire(hit.copy_from)
        return hit

    def _drop_hit(self, hit: PrefixHit) -> None:
        self.pool.release_all(hit.block_ids)
        if hit.copy_from is not None:
            self.pool.release(hit.copy_from)

    # -- allocation ---------------------------------------------------------------------------
    def _blocks_needed(self, num_held: int, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def _allocate(self, block_ids: list[int], num_tokens: int) -> None:
        """Grow block_ids to hold num_tokens, unpinning idle conversations (LRU) when the pool is dry.

        Raises PoolExhaustedError with block_ids unchanged if it cannot.
        """
        new: list[int] = []
        try:
            for _ in range(self._blocks_needed(len(block_ids), num_tokens)):
                while self.pool.num_free == 0 and self.conversations:
                    self.unpin_lru()
                new.append(self.pool.allocate())
        except PoolExhaustedError:
            self.pool.release_all(new)
            raise
        block_ids.extend(new)

    # -- conversation pins --------------------------------------------------------------------
    def pin(self, key: str, token_ids: Seq[int], block_ids: Seq[int]) -> None:
        """Keep the blocks holding token_ids' KV resident under key (replacing the key's old pin)."""
        used = block_ids[: -(-len(token_ids) // self.block_size)] if token_ids else []
        for block_id in used:
            self.pool.acquire(block_id)
        old = self.conversations.pop(key, None)
        if old is not None:
            self.pool.release_all(old.block_ids)
        if used:
            self.conversations[key] = ConversationEntry(list(token_ids), list(used))

    def unpin(self, key: str) -> None:
        entry = self.conversations.pop(key, None)
        if entry is not None:
            self.pool.release_all(entry.block_ids)

    def unpin_lru(self) -> None:
        key = next(iter(self.conversations))
        self.unpin(key)

    def unpin_all(self) -> None:
        while self.conversations:
            self.unpin_lru()

    def check_integrity(self) -> None:
        """The pool's invariants, and every pinned block held (call when idle: tests)."""
        self.pool.check_integrity()
        for entry in self.conversations.values():
            assert all(self.pool.blocks[b].ref_count > 0 for b in entry.block_ids), "a pinned block is free"
