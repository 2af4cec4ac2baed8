"""Which blocks each sequence holds: prefix matching, growth, conversation pins, and freeing.

The scheduler talks to this manager only in sequences and token counts; the
pool's ref counts stay in here. Two ways to reuse computed KV:

- content: full blocks whose chained hash matches (shared system prompts,
  forks, another conversation with the same prefix under the same salt);
- conversation: the pin a finished turn leaves under its conversation key
  keeps its blocks resident, including the partial last block, so the next
  turn recomputes nothing it already has. The partial block is copied
  (copy-on-write) because the old turn's tokens after the divergence point
  must not be overwritten in a block someone else may still read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.engine.block_pool import BlockPool, PoolExhaustedError, chain_hash, prefix_hashes


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


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    limit = min(len(a), len(b))
    for i in range(limit):
        if a[i] != b[i]:
            return i
    return limit


class KVCacheManager:
    """Block bookkeeping for sequences on top of one BlockPool."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.conversations: OrderedDict[str, ConversationEntry] = OrderedDict()

    # -- reuse --------------------------------------------------------------------------------
    def match(self, token_ids: Sequence[int], salt: bytes, conversation_key: str | None) -> PrefixHit:
        """Find and hold the longest reusable prefix; at least the last token is left to compute."""
        cap = len(token_ids) - 1
        bs = self.block_size
        full = self.pool.match(prefix_hashes(token_ids[:cap], bs, salt))
        hit = PrefixHit(block_ids=list(full), num_tokens=len(full) * bs)
        entry = self.conversations.get(conversation_key) if conversation_key else None
        if entry is not None:
            self.conversations.move_to_end(conversation_key)  # type: ignore[arg-type]
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

    # -- growth -------------------------------------------------------------------------------
    def blocks_needed(self, num_held: int, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    @property
    def num_reclaimable(self) -> int:
        """Blocks that could be handed out now: free ones plus those only pins hold."""
        pinned_only = {b for e in self.conversations.values() for b in e.block_ids
                       if self.pool.blocks[b].ref_count == 1}
        return self.pool.num_free + len(pinned_only)

    def allocate(self, block_ids: list[int], num_tokens: int) -> None:
        """Grow block_ids to hold num_tokens, unpinning idle conversations (LRU) when the pool is dry.

        Raises PoolExhaustedError with block_ids unchanged if it cannot.
        """
        needed = self.blocks_needed(len(block_ids), num_tokens)
        new: list[int] = []
        try:
            for _ in range(needed):
                while self.pool.num_free == 0 and self.conversations:
                    self.unpin_lru()
                new.append(self.pool.allocate())
        except PoolExhaustedError:
            self.pool.release_all(new)
            raise
        block_ids.extend(new)

    def commit(self, token_ids: Sequence[int], block_ids: Sequence[int], block_hashes: list[bytes],
               num_computed: int, salt: bytes) -> None:
        """Hash every block that became full (its KV computed) so later requests can reuse it."""
        bs = self.block_size
        while (len(block_hashes) + 1) * bs <= num_computed:
            i = len(block_hashes)
            parent = block_hashes[-1] if block_hashes else None
            block_hash = chain_hash(parent, token_ids[i * bs:(i + 1) * bs], salt)
            self.pool.commit(block_ids[i], block_hash)
            block_hashes.append(block_hash)

    def free(self, block_ids: list[int]) -> None:
        self.pool.release_all(block_ids)
        block_ids.clear()

    # -- conversation pins --------------------------------------------------------------------
    def pin(self, key: str, token_ids: Sequence[int], block_ids: Sequence[int]) -> None:
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

    @property
    def num_pinned_blocks(self) -> int:
        return len({b for e in self.conversations.values() for b in e.block_ids})
