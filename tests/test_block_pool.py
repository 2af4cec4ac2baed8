"""BlockPool: pure-Python bookkeeping, tested in milliseconds (the KV manager on top: test_kv_manager.py)."""

from __future__ import annotations

import pytest

from server.engine.block_pool import (
    BlockPool,
    PoolExhaustedError,
    chain_hash,
    prefix_hashes,
)


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


def test_match_is_the_longest_run_of_cached_blocks_and_takes_no_reference() -> None:
    pool = BlockPool(4, 2)
    a, b = pool.allocate(), pool.allocate()
    hashes = prefix_hashes([1, 2, 3, 4, 5], 2)
    pool.commit(a, hashes[0])
    pool.commit(b, hashes[1])
    assert pool.match(hashes) == [a, b]
    assert pool.match([hashes[0], b"miss", hashes[1]]) == [a]
    assert pool.blocks[a].ref_count == 1
    pool.check_integrity()
