"""gather_block_rows: whole blocks out of a slot pool in decode-row layout, checked against numpy.

On a CUDA machine this runs the kernel (asserted); elsewhere the MLX-ops path, which is what CI has.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from server.engine.block_gather import compile_kernels, gather_block_rows, load_block_rows, uses_kernel


def reference(pool: np.ndarray, table: np.ndarray, block_size: int) -> np.ndarray:
    slots, heads, dim = pool.shape
    out = np.empty((table.shape[0] * heads, table.shape[1] * block_size, dim), pool.dtype)
    for j, blocks in enumerate(table):
        tokens = np.concatenate([pool[b * block_size : (b + 1) * block_size] for b in blocks])  # (T, H, D)
        out[j * heads : (j + 1) * heads] = tokens.transpose(1, 0, 2)
    return out


@pytest.mark.parametrize("dtype,dim", [(mx.float32, 8), (mx.bfloat16, 64), (mx.float16, 8), (mx.float32, 5)])
def test_gather_block_rows_matches_reference(dtype: mx.Dtype, dim: int) -> None:
    rng = np.random.default_rng(dim)
    block_size, heads, num_blocks = 4, 3, 10
    pool = mx.array(rng.standard_normal((num_blocks * block_size, heads, dim)).astype(np.float32)).astype(dtype)
    table = np.array([[7, 2, 9], [0, 0, 0], [5, 1, 3]], dtype=np.int32)  # repeated blocks pad a short table
    got = gather_block_rows([pool], mx.array(table), block_size)[0]
    want = reference(np.array(pool.astype(mx.float32)), table, block_size)
    assert got.shape == want.shape and got.dtype == dtype
    assert np.array_equal(np.array(got.astype(mx.float32)), want)
    if mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available():
        assert uses_kernel(pool) == ((dim * dtype.size) % 16 == 0)


def test_gather_block_rows_one_block_one_row() -> None:
    pool = mx.arange(2 * 2 * 1 * 4, dtype=mx.float32).reshape(4, 1, 4)  # 2 blocks of 2 slots, 1 head
    got = gather_block_rows([pool], mx.array([[1]]), 2)[0]
    assert got.tolist() == [[[8.0, 9.0, 10.0, 11.0], [12.0, 13.0, 14.0, 15.0]]]


def test_gather_block_rows_many_pools_of_mixed_shapes() -> None:
    """Pools of several shapes and dtypes (K and V of different head sizes, one odd size that cannot use
    the kernel) come back in order, each gathered right."""
    rng = np.random.default_rng(7)
    block_size, num_blocks = 4, 6
    shapes = [(2, 8, mx.bfloat16), (2, 8, mx.bfloat16), (2, 16, mx.float32), (2, 5, mx.float32), (2, 8, mx.bfloat16)]
    pools = [
        mx.array(rng.standard_normal((num_blocks * block_size, h, d)).astype(np.float32)).astype(t)
        for h, d, t in shapes
    ]
    table = np.array([[3, 1], [5, 5]], dtype=np.int32)
    got = gather_block_rows(pools, mx.array(table), block_size)
    assert len(got) == len(pools)
    for pool, rows in zip(pools, got):
        want = reference(np.array(pool.astype(mx.float32)), table, block_size)
        assert np.array_equal(np.array(rows.astype(mx.float32)), want)


@pytest.mark.parametrize("capacity_rows,rows", [(2, [0, 1]), (3, [2, 0]), (8, [5]), (4, [1, 2])])
@pytest.mark.parametrize("dtype,dim", [(mx.bfloat16, 64), (mx.float32, 5)])
def test_load_block_rows_replaces_only_the_loaded_rows(
    capacity_rows: int, rows: list[int], dtype: mx.Dtype, dim: int
) -> None:
    """Loaded rows get their blocks' tokens in their first columns (the rest of the row, and every other
    row, keep the old table's contents), whichever path runs: the whole-table kernel when the loaded
    rows fill half the table or more (on CUDA), gather + slice update otherwise."""
    rng = np.random.default_rng(capacity_rows * 10 + dim)
    block_size, heads, num_blocks, columns = 4, 3, 12, 16
    pool = mx.array(rng.standard_normal((num_blocks * block_size, heads, dim)).astype(np.float32)).astype(dtype)
    old = mx.array(rng.standard_normal((capacity_rows * heads, columns, dim)).astype(np.float32)).astype(dtype)
    table = rng.permutation(num_blocks)[: len(rows) * 3].reshape(len(rows), 3).astype(np.int32)
    old_np = np.array(old.astype(mx.float32))
    got = load_block_rows([old], [pool], mx.array(table), rows, block_size)[0]
    want = old_np.copy()
    gathered = reference(np.array(pool.astype(mx.float32)), table, block_size)
    for j, row in enumerate(rows):
        want[row * heads : (row + 1) * heads, : 3 * block_size] = gathered[j * heads : (j + 1) * heads]
    assert got.shape == old.shape and got.dtype == dtype
    assert np.array_equal(np.array(got.astype(mx.float32)), want)


def test_load_block_rows_wider_than_the_table_is_cut_at_its_columns() -> None:
    pool = mx.arange(4 * 2 * 1 * 4, dtype=mx.float32).reshape(8, 1, 4)  # 4 blocks of 2 slots, 1 head
    old = mx.zeros((1, 3, 4))
    got = load_block_rows([old], [pool], mx.array([[3, 0]]), [0], 2)[0]
    assert got.tolist() == [[[24.0, 25.0, 26.0, 27.0], [28.0, 29.0, 30.0, 31.0], [0.0, 1.0, 2.0, 3.0]]]


@pytest.mark.skipif(
    not (mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()),
    reason="compile_kernels only does something on CUDA",
)
def test_compile_kernels_leaves_the_pools_alone() -> None:
    """The start-up warm-up runs both kernels and changes nothing."""
    pool = mx.arange(8 * 2 * 16, dtype=mx.float32).reshape(8, 2, 16)
    compile_kernels([pool, pool.astype(mx.bfloat16)], 4)
    assert pool.tolist() == mx.arange(8 * 2 * 16, dtype=mx.float32).reshape(8, 2, 16).tolist()
