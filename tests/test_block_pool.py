"""BlockPool and KVCacheManager: pure-Python bookkeeping, tested in milliseconds."""

from __future__ import annotations

import pytest

from server.engine.block_pool import BlockPool, PoolExhaustedError, chain_hash, prefix_hashes
from server.engine.kv_manager import KVCacheManager, common_prefix_length


def test_allocate_release_keeps_counts() -> None:
    pool = BlockPool(4, 2)
    ids = [pool.allocate() for _ in range(4)]
    assert pool.num_free == 0 and pool.num_used == 4
    with pytest.raises(PoolExhaustedError):
        pool.allocate()
    pool.release_all(ids)
    assert pool.num_free == 4
    pool.check_integrity()


def test_freed_blocks_keep_their_hash_until_reused_lru() -> None:
    pool = BlockPool(3, 2)
    a, b = pool.allocate(), pool.allocate()
    pool.commit(a, b"ha")
    pool.commit(b, b"hb")
    pool.release_all([a, b])  # reverse: b freed first, then a
    assert pool.lookup(b"ha") == a and pool.num_cached_free == 2
    first = pool.allocate()  # the never-used block goes first
    assert first not in (a, b)
    second = pool.allocate()  # then the least recently freed: b (the chain tail)
    assert second == b and pool.lookup(b"hb") is None and pool.lookup(b"ha") == a
    pool.check_integrity()


def test_acquire_revives_a_free_cached_block() -> None:
    pool = BlockPool(2, 2)
    a = pool.allocate()
    pool.commit(a, b"h")
    pool.release(a)
    pool.acquire(a)
    assert pool.num_free == 1 and pool.blocks[a].ref_count == 1 and pool.lookup(b"h") == a
    pool.check_integrity()


def test_chain_hash_depends_on_parent_salt_and_tokens() -> None:
    base = chain_hash(None, [1, 2])
    assert chain_hash(None, [1, 2]) == base
    assert chain_hash(b"p", [1, 2]) != base
    assert chain_hash(None, [1, 2], b"tenant-b") != base
    assert chain_hash(None, [2, 1]) != base
    assert len(prefix_hashes(list(range(9)), 4)) == 2


def test_match_takes_refs_and_leaves_the_last_token() -> None:
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    tokens = list(range(8))
    held: list[int] = []
    kv.allocate(held, 8)
    hashes: list[bytes] = []
    kv.commit(tokens, held, hashes, 8, b"")
    assert len(hashes) == 2
    # exactly 8 tokens: only the first block may be reused (the last token must be computed)
    hit = kv.match(tokens, b"", None)
    assert hit.num_tokens == 4 and hit.block_ids == held[:1]
    assert pool.blocks[held[0]].ref_count == 2
    longer = kv.match(tokens + [99], b"", None)
    assert longer.num_tokens == 8
    other_salt = kv.match(tokens + [99], b"other", None)
    assert other_salt.num_tokens == 0
    kv.free(hit.block_ids)
    kv.free(longer.block_ids)
    kv.free(held)
    pool.check_integrity()
    assert pool.num_free == 8


def test_conversation_pin_reuses_partial_block_and_survives_pressure_until_lru() -> None:
    pool = BlockPool(6, 4)
    kv = KVCacheManager(pool)
    turn1 = list(range(10))  # 2 full blocks + 2 tokens
    blocks: list[int] = []
    kv.allocate(blocks, 10)
    kv.commit(turn1, blocks, [], 10, b"")
    kv.pin("conv", turn1, blocks)
    kv.free(blocks)
    assert pool.num_used == 3  # pinned
    turn2 = turn1 + [50, 51]
    hit = kv.match(turn2, b"", "conv")
    assert hit.num_tokens == 10 and hit.copy_from is not None and len(hit.block_ids) == 2
    kv.free(hit.block_ids)
    pool.release(hit.copy_from)
    # pressure: allocating the whole pool unpins the idle conversation
    grab: list[int] = []
    kv.allocate(grab, 6 * 4)
    assert not kv.conversations and len(grab) == 6
    kv.free(grab)
    pool.check_integrity()


def test_edited_history_reuses_only_the_common_prefix() -> None:
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    turn1 = list(range(12))
    blocks: list[int] = []
    kv.allocate(blocks, 12)
    kv.commit(turn1, blocks, [], 12, b"")
    kv.pin("c", turn1, blocks)
    kv.free(blocks)
    edited = list(range(6)) + [77] * 6
    hit = kv.match(edited, b"", "c")
    assert hit.num_tokens == 6 == common_prefix_length(turn1, edited)
    kv.free(hit.block_ids)
    pool.release(hit.copy_from)  # type: ignore[arg-type]
    kv.unpin_all()
    assert pool.num_free == 8
    pool.check_integrity()


def test_failed_allocation_changes_nothing() -> None:
    pool = BlockPool(3, 2)
    kv = KVCacheManager(pool)
    mine: list[int] = []
    kv.allocate(mine, 4)
    other: list[int] = []
    with pytest.raises(PoolExhaustedError):
        kv.allocate(other, 6)
    assert other == [] and pool.num_free == 1
    pool.check_integrity()
