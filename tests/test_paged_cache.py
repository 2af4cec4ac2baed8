"""The KV slot pools: copies between blocks stay in place (no whole-pool copy) and copy the right slots."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest

from server.engine.attention_mask import attention_mask, row_mask
from server.engine.paged_cache import KVShape, KVStore, slot_ids


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


@pytest.mark.parametrize("window", [None, 3])
def test_every_mask_is_the_causal_window_rule(window: int | None) -> None:
    """Prefill chunks over blocks, decode rows and mlx-lm's array masks all follow one rule: the query at
    position p sees keys j <= p (and j > p - window)."""
    offsets, n = [2, 5, 0], 3
    width = max(offsets) + n
    mask = np.array(attention_mask(offsets, n, window))
    for r, start in enumerate(offsets):
        for i in range(n):
            p = start + i
            expected = [j <= p and (window is None or j > p - window) for j in range(width)]
            assert mask[r, 0, i].tolist() == expected
    decode = np.array(row_mask(mx.array(offsets), 1, width, window))
    assert decode.shape == (3, 1, 1, width) and (decode[:, 0, 0] == mask[:, 0, 0]).all()


def random_store(shape: KVShape, num_blocks: int, block_size: int, seed: int) -> KVStore:
    """A slot pool filled with random K/V (zeros could hide a copy that never happened)."""
    store = KVStore(shape, num_blocks=num_blocks, block_size=block_size)
    mx.random.seed(seed)
    for layer in range(shape.num_layers):
        store.keys[layer] = mx.random.normal(store.keys[layer].shape)
        store.values[layer] = mx.random.normal(store.values[layer].shape)
    return store


def test_decode_rows_load_joining_sequences_together() -> None:
    """Rows joining at once, with different lengths (partial blocks, scattered block ids), hold exactly
    their sequences' pool K/V; rows already holding their context are left alone."""
    from server.engine.decode_rows import DecodeRows
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence

    shape = KVShape(num_layers=2, kv_heads=(2, 3), k_dims=(4, 4), v_dims=(4, 5), dtype=mx.float32)
    bs = 4
    store = random_store(shape, 12, bs, seed=3)
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
                got = table[row * heads : (row + 1) * heads, :count]
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
                assert mx.array_equal(want, table[row * heads : (row + 1) * heads, :count]).item(), (
                    s.request_id,
                    layer,
                )


def test_decode_rows_write_back_copies_only_new_columns_into_the_pool() -> None:
    """Decode steps write K/V into the rows alone; write_back copies each row's columns the pool lacks
    into the slots of those positions (and nothing else), once."""
    from server.engine.decode_rows import DecodeRows
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence

    shape = KVShape(num_layers=2, kv_heads=(2, 1), k_dims=(4, 4), v_dims=(4, 3), dtype=mx.float32)
    bs = 4
    store = random_store(shape, 8, bs, seed=5)
    params = SamplingParams(max_tokens=8)
    seqs = []
    for name, blocks, computed in (("a", [6, 1, 3], 3), ("b", [2, 7, 0], 6)):
        s = Sequence(name, 0, list(range(1, 12)), params, None, None, 8)  # type: ignore[arg-type]
        s.block_ids, s.num_computed_tokens = blocks, computed
        seqs.append(s)
    rows = DecodeRows(store)
    before_k = [mx.array(k) for k in store.keys]
    written: dict[tuple[str, int, int], tuple[mx.array, mx.array]] = {}  # (seq, layer, position) -> K, V
    for step in range(3):
        offsets = [s.num_computed_tokens for s in seqs]
        caches, order = rows.step_caches(rows.assign(seqs, offsets))
        for layer, cache in enumerate(caches):
            heads = shape.kv_heads[layer]
            k = mx.random.normal((2, heads, 1, shape.k_dims[layer]))
            v = mx.random.normal((2, heads, 1, shape.v_dims[layer]))
            cache.update_and_fetch(k, v)
            for i, s in enumerate(seqs):
                written[(s.request_id, layer, offsets[i])] = (k[i, :, 0], v[i, :, 0])
        for s in seqs:
            s.num_computed_tokens += 1
    for layer in range(2):  # nothing reached the pool yet
        assert mx.array_equal(store.keys[layer], before_k[layer]).item()
    assert all(rows.unpooled(s) for s in seqs)
    rows.write_back(seqs, [s.num_computed_tokens for s in seqs])
    assert not any(rows.unpooled(s) for s in seqs)
    touched = set()
    for (name, layer, position), (k, v) in written.items():
        s = seqs[0] if name == "a" else seqs[1]
        slot = s.block_ids[position // bs] * bs + position % bs
        touched.add((layer, slot))
        assert mx.array_equal(store.keys[layer][slot], k).item() and mx.array_equal(store.values[layer][slot], v).item()
    for layer in range(2):
        for slot in range(8 * bs):
            if (layer, slot) not in touched:
                assert mx.array_equal(store.keys[layer][slot], before_k[layer][slot]).item()
    # written back once: a later write-back with nothing new leaves the pool alone
    snapshot = [mx.array(k) for k in store.keys]
    rows.write_back(seqs, [s.num_computed_tokens for s in seqs])
    assert all(mx.array_equal(a, b).item() for a, b in zip(store.keys, snapshot))


def test_decode_steps_compute_offsets_and_masks_on_the_device_in_steady_decoding() -> None:
    """A step whose rows all advanced by one since the previous step derives its offsets from that
    step's on the device; either way offsets, masks (sliding window too) and write columns equal the
    host-computed ones, and a batch that changed starts over from host values."""
    from server.engine.decode_rows import DecodeRows
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence

    shape = KVShape(num_layers=1, kv_heads=(2,), k_dims=(4,), v_dims=(4,), dtype=mx.float32)
    store = random_store(shape, 16, 4, seed=3)
    params = SamplingParams(max_tokens=8)
    seqs = []
    for name, computed in (("a", 3), ("b", 9), ("c", 5)):
        s = Sequence(name, 0, list(range(1, 20)), params, None, None, 8)  # type: ignore[arg-type]
        s.block_ids, s.num_computed_tokens = [len(seqs) * 4 + i for i in range(4)], computed
        seqs.append(s)
    rows = DecodeRows(store)
    for step in range(4):
        if step == 3:
            seqs = seqs[:2]  # "c" left: the next step's offsets come from the host again
        offsets = [s.num_computed_tokens for s in seqs]
        caches, _ = rows.step_caches(rows.assign(seqs, offsets))
        decode_step = caches[0].step
        assert decode_step.derived == (step in (1, 2))
        assert decode_step.device_offsets.tolist() == offsets
        assert mx.array_equal(decode_step.mask(None), attention_mask(offsets, 1, None)).item()
        assert mx.array_equal(decode_step.mask(2), attention_mask(offsets, 1, 2)).item()
        row_index, column = decode_step.indices(2)
        assert row_index.tolist() == [0, 1, 2, 3, 4, 5][: 2 * len(offsets)]
        assert column.tolist() == [o for o in offsets for _ in range(2)]
        for s in seqs:
            s.num_computed_tokens += 1


def test_decode_rows_move_down_into_holes_left_by_finished_sequences() -> None:
    """When sequences that finished leave holes making up a quarter or more of the rows a step would
    compute, the rows above move down into them with their KV, lengths and write-back marks, and the
    next step computes only as many rows as sequences."""
    from server.engine.decode_rows import DecodeRows
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence

    shape = KVShape(num_layers=2, kv_heads=(2, 1), k_dims=(4, 4), v_dims=(4, 3), dtype=mx.float32)
    bs = 4
    store = random_store(shape, 32, bs, seed=9)
    params = SamplingParams(max_tokens=8)
    seqs = []
    for i in range(6):
        s = Sequence(f"s{i}", 0, list(range(1, 12)), params, None, None, 8)  # type: ignore[arg-type]
        s.block_ids, s.num_computed_tokens = [i * 4 + b for b in range(4)], 3 + i
        seqs.append(s)
    rows = DecodeRows(store)
    for _ in range(2):
        offsets = [s.num_computed_tokens for s in seqs]
        caches, _ = rows.step_caches(rows.assign(seqs, offsets))
        for layer, cache in enumerate(caches):
            heads = shape.kv_heads[layer]
            cache.update_and_fetch(
                mx.random.normal((6, heads, 1, 4)), mx.random.normal((6, heads, 1, shape.v_dims[layer]))
            )
        for s in seqs:
            s.num_computed_tokens += 1
    rows.write_back(seqs[4:5], [seqs[4].num_computed_tokens - 1])  # s4 pooled up to one column short

    def row_contents(seq: Sequence) -> list[np.ndarray]:
        row, n = rows.row_of[(seq.request_id, 0)], seq.num_computed_tokens
        out = []
        for layer, heads in enumerate(shape.kv_heads):
            for table in (rows.keys, rows.values):
                out.append(np.array(table[layer][row * heads : (row + 1) * heads, :n]))
        return out

    kept = [seqs[4], seqs[5]]
    before = [row_contents(s) for s in kept]
    marks = [(rows.length[rows.row_of[(s.request_id, 0)]], rows.pooled[rows.row_of[(s.request_id, 0)]]) for s in kept]
    assigned = rows.assign(kept, [s.num_computed_tokens for s in kept])
    assert sorted(assigned) == [0, 1]  # rows 5 and 4 moved into holes 0 and 1
    for s, want, (length, pooled) in zip(kept, before, marks):
        assert all(np.array_equal(a, b) for a, b in zip(row_contents(s), want))
        row = rows.row_of[(s.request_id, 0)]
        assert rows.pooled[row] == pooled and rows.length[row] == s.num_computed_tokens <= length
    assert rows.unpooled(seqs[4]) and rows.unpooled(seqs[5])
    caches, order = rows.step_caches(assigned)
    assert len(order) == 2 and -1 not in order


def test_decode_rows_keep_their_places_while_holes_are_few() -> None:
    from server.engine.decode_rows import DecodeRows
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence

    shape = KVShape(num_layers=1, kv_heads=(1,), k_dims=(4,), v_dims=(4,), dtype=mx.float32)
    store = random_store(shape, 32, 4, seed=2)
    seqs = []
    for i in range(8):
        s = Sequence(f"s{i}", 0, list(range(1, 8)), SamplingParams(max_tokens=4), None, None, 4)  # type: ignore[arg-type]
        s.block_ids, s.num_computed_tokens = [i * 2, i * 2 + 1], 3
        seqs.append(s)
    rows = DecodeRows(store)
    first = rows.assign(seqs, [3] * 8)
    rest = seqs[:3] + seqs[4:]  # one hole in eight rows: not worth moving anything
    assert rows.assign(rest, [3] * 7) == first[:3] + first[4:]
