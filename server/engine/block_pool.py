"""The block pool: which KV blocks exist, who holds them, and which prefix each full one stores.

Pure Python, no MLX: the bytes live in ``paged_cache.KVStore``; this module
only hands out block ids. A block is free when no sequence and no
conversation pin holds it (``ref_count == 0``). Free blocks keep their hash
and sit in an LRU free list: a hit on a free block revives it, and a block
only forgets what it stored when it is taken again for new tokens.

    free list (LRU -> MRU)         hash -> block id
    [7][3][9][12] ...              h(A)->3, h(A,B)->9   (cached but free)
     ^ allocate() takes 7 first    revive(3) removes 3 from the list

A full block's hash chains its parent's hash, a salt (model/adapter id and
tenant scope: what changes KV besides tokens) and its token ids, so equal
hashes mean equal prefixes. blake2b keeps collisions out of reach.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


class PoolExhaustedError(RuntimeError):
    """No block can be freed for new work: the pool is full of running sequences."""


def chain_hash(parent: bytes | None, token_ids: Sequence[int], salt: bytes = b"") -> bytes:
    """The hash of a full block: its parent's hash, the salt and its tokens."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent or b"root")
    digest.update(salt)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def prefix_hashes(token_ids: Sequence[int], block_size: int, salt: bytes = b"") -> list[bytes]:
    """Hashes of every full block of token_ids, in order."""
    hashes: list[bytes] = []
    parent: bytes | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, token_ids[start : start + block_size], salt)
        hashes.append(parent)
    return hashes


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None


class BlockPool:
    """Ref-counted fixed-size blocks with an LRU free list that doubles as the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[bytes, int] = {}
        self._num_cached_free = 0  # free blocks that still hold a hash

    # -- counts -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return self._num_cached_free

    # -- allocation ---------------------------------------------------------------------------
    def allocate(self) -> int:
        """Take the least recently freed block (forgetting what it cached); ref_count becomes 1."""
        if not self._free:
            raise PoolExhaustedError("no free KV blocks")
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            self._num_cached_free -= 1
            if self._by_hash.get(block.hash) == block_id:
                del self._by_hash[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def acquire(self, block_id: int) -> None:
        """Take one more reference (a prefix hit, a fork, a pin); revives a free cached block."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
            self._num_cached_free -= block.hash is not None
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        """Drop one reference; at zero the block joins the free list's MRU end, keeping its hash."""
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} released more often than taken"
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            self._num_cached_free += block.hash is not None

    def release_all(self, block_ids: Sequence[int]) -> None:
        """Release in reverse so a chain's tail is evicted before its head."""
        for block_id in reversed(block_ids):
            self.release(block_id)

    # -- prefix cache -------------------------------------------------------------------------
    def lookup(self, block_hash: bytes) -> int | None:
        return self._by_hash.get(block_hash)

    def commit(self, block_id: int, block_hash: bytes) -> None:
        """Record that a held block is full and stores the prefix with this hash."""
        block = self.blocks[block_id]
        assert block.ref_count > 0, "only a held block can be committed"
        if block.hash is not None:
            return
        block.hash = block_hash
        self._by_hash.setdefault(block_hash, block_id)  # an equal twin already cached stays canonical

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The longest run of cached blocks for these chained hashes (no references taken)."""
        found: list[int] = []
        for block_hash in hashes:
            block_id = self._by_hash.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def check_integrity(self) -> None:
        """Free + used = total; free blocks have ref 0; held ones > 0; the hash map points at its blocks."""
        assert len(self._free) + sum(1 for b in self.blocks if b.ref_count > 0) == self.num_blocks
        for block in self.blocks:
            assert block.ref_count >= 0
            assert (block.ref_count == 0) == (block.id in self._free), f"block {block.id} misfiled"
        assert self._num_cached_free == sum(1 for i in self._free if self.blocks[i].hash is not None)
        for block_hash, block_id in self._by_hash.items():
            assert self.blocks[block_id].hash == block_hash
