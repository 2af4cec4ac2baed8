"""The KV slot pools: copies between blocks stay in place (no whole-pool copy) and copy the right slots."""

from __future__ import annotations

import time

import mlx.core as mx

from server.engine.paged_cache import KVShape, KVStore, attention_mask, slot_ids


def test_copy_slots_copies_exactly_and_in_place() -> None:
    store = KVStore(KVShape(2, (2, 2), (4, 4), (4, 4), mx.float32), num_blocks=4, block_size=4)
    for layer in range(2):
        store.keys[layer][4:8] = mx.arange(4 * 2 * 4, dtype=mx.float32).reshape(4, 2, 4) + layer
    mx.eval(store.keys)
    store.copy_slots(1, 3, 3)
    for layer in range(2):
        assert mx.array_equal(store.keys[layer][12:15], store.keys[layer][4:7]).item()
        assert not store.keys[layer][15].any().item()


def test_copy_slots_does_not_copy_the_whole_pool() -> None:
    big = KVStore(KVShape(30, (3,) * 30, (64,) * 30, (64,) * 30, mx.float32), num_blocks=4096, block_size=16)
    big.copy_slots(1, 2, 5)  # warm up
    started = time.perf_counter()
    big.copy_slots(3, 4, 9)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.1, f"copy_slots took {elapsed * 1000:.0f} ms: the pool was copied, not updated in place"


def test_slots_and_masks() -> None:
    assert slot_ids([5, 2], 2, 6, 4).tolist() == [22, 23, 8, 9]
    assert attention_mask([7], 1, None) is None and attention_mask([0], 5, None) == "causal"
    mask = attention_mask([1, 3], 1, None)
    assert mask.shape == (2, 1, 1, 4) and mask[0, 0, 0].tolist() == [True, True, False, False]
    windowed = attention_mask([5], 1, 2)
    assert windowed[0, 0, 0].tolist() == [False, False, False, False, True, True]


def test_decode_rows_load_joining_sequences_together() -> None:
    """Rows joining at once, with different lengths (partial blocks, scattered block ids), hold exactly
    their sequences' pool K/V; rows already holding their context are left alone."""
    from server.engine.decode_rows import DecodeRows
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence

    shape = KVShape(num_layers=2, kv_heads=(2, 3), k_dims=(4, 4), v_dims=(4, 5), dtype=mx.float32)
    bs = 4
    store = KVStore(shape, num_blocks=12, block_size=bs)
    mx.random.seed(3)
    for layer in range(2):
        store.keys[layer] = mx.random.normal(store.keys[layer].shape)
        store.values[layer] = mx.random.normal(store.values[layer].shape)
    params = SamplingParams(max_tokens=1)

    def seq(name: str, length: int, blocks: list[int]) -> Sequence:
        s = Sequence(name, 0, list(range(1, length + 1)), params, None, None, 1)  # type: ignore[arg-type]
        s.block_ids = blocks
        return s

    rows = DecodeRows(store)
    first = seq("a", 6, [7, 2])
    assert rows.assign([first], [5]) == [0]
    joining = [seq("b", 11, [1, 9, 4]), seq("c", 2, [11]), seq("d", 8, [3, 0])]
    counts = [10, 1, 8]
    assigned = rows.assign([first, *joining], [5, *counts])
    assert assigned == [0, 1, 2, 3]
    for s, row, count in zip([first, *joining], assigned, [5, *counts]):
        slots = mx.array(slot_ids(s.block_ids, 0, count, bs))
        for layer, heads in enumerate(shape.kv_heads):
            for pool, table in ((store.keys[layer], rows.keys[layer]), (store.values[layer], rows.values[layer])):
                want = pool[slots].transpose(1, 0, 2)  # (heads, count, dim)
                got = table[row * heads:(row + 1) * heads, :count]
                assert mx.array_equal(want, got).item(), (s.request_id, layer)

    # b and d leave: the next two joiners fill rows 1 and 3, not consecutive (the scatter path)
    later = [seq("e", 7, [5, 6]), seq("f", 13, [8, 10, 2, 1])]
    assigned = rows.assign([first, joining[1], *later], [5, 1, 7, 13])
    assert assigned == [0, 2, 1, 3]
    for s, row, count in zip(later, assigned[2:], [7, 13]):
        slots = mx.array(slot_ids(s.block_ids, 0, count, bs))
        for layer, heads in enumerate(shape.kv_heads):
            for pool, table in ((store.keys[layer], rows.keys[layer]), (store.values[layer], rows.values[layer])):
                want = pool[slots].transpose(1, 0, 2)
                assert mx.array_equal(want, table[row * heads:(row + 1) * heads, :count]).item(), (s.request_id, layer)
