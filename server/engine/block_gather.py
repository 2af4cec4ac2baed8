"""Whole KV blocks copied out of a slot pool into decode-row layout, in one pass.

A pool is ``(num_blocks * block_size, heads, dim)`` (token-major, see paged_cache.py); a decode row
is ``(heads, columns, dim)`` (mlx-lm's cache layout, see decode_rows.py). Turning J sequences'
block tables ``(J, W)`` into ``(J * heads, W * block_size, dim)`` is a gather of whole blocks plus a
transpose. With MLX ops that is two copies, and MLX's CUDA gather moves about 170 GB/s on an H100
(element by element): 9 ms for a 8,192-token sequence of a 48-layer model. On CUDA this module
runs one kernel instead, every thread moving 16 bytes straight from the pool slot to its place in
the row; everywhere else (CPU, Metal, head sizes that are not a multiple of 16 bytes) it uses the
MLX ops, which give the same result.

`load_block_rows` puts gathered blocks into rows of an existing decode-row table. MLX can only
copy into a table with a second pass (a slice update), which on the H100 moved about 1.3 TB/s and
doubled the cost of a load. When the rows being loaded fill most of the table (a batch starting
together, or one long request alone), the CUDA path instead writes a whole new table in one kernel:
loaded rows from the pool, every other row from the old table. When they fill little of it (one
request joining a big batch), gather + slice update is cheaper: it writes only the loaded rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

VECTOR_BYTES = 16

# grid: x = (column, 16-byte vector) within a row, y = row (sequence, head); every division is by a
# compile-time constant
_SOURCE = """
    const unsigned int width = table_shape[1];
    const unsigned int x = blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= width * BLOCK * VECS) {
        return;
    }
    const unsigned int row = blockIdx.y;
    const unsigned int column = x / VECS;
    const unsigned int job = row / HEADS;
    const unsigned int head = row % HEADS;
    const size_t block = table[job * width + column / BLOCK];
    const size_t slot = block * BLOCK + column % BLOCK;
    const size_t target = (size_t)row * width * BLOCK * VECS + x;
    reinterpret_cast<uint4*>(out)[target] =
        reinterpret_cast<const uint4*>(pool)[(slot * HEADS + head) * VECS + x % VECS];
"""


# grid: x = (column, 16-byte vector) over the table's columns, y = table row (row, head); rows that
# load take their first WIDTH * BLOCK columns from the pool, everything else is copied from the old table
_TABLE_SOURCE = """
    const unsigned int width = table_shape[1];
    const unsigned int columns = old_shape[1];
    const unsigned int x = blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= columns * VECS) {
        return;
    }
    const unsigned int row = blockIdx.y;
    const unsigned int column = x / VECS;
    const int job = row_job[row / HEADS];
    const size_t target = (size_t)row * columns * VECS + x;
    if (job >= 0 && column < width * BLOCK) {
        const size_t block = table[job * width + column / BLOCK];
        const size_t slot = block * BLOCK + column % BLOCK;
        reinterpret_cast<uint4*>(out)[target] =
            reinterpret_cast<const uint4*>(pool)[(slot * HEADS + row % HEADS) * VECS + x % VECS];
    } else {
        reinterpret_cast<uint4*>(out)[target] = reinterpret_cast<const uint4*>(old)[target];
    }
"""


@functools.cache
def _table_kernel() -> Any:
    return mx.fast.cuda_kernel(
        name="kv_block_table",
        input_names=["pool", "table", "row_job", "old"],
        output_names=["out"],
        source=_TABLE_SOURCE,
    )


@functools.cache
def _cuda_kernel() -> Any:
    return mx.fast.cuda_kernel(
        name="kv_block_rows", input_names=["pool", "table"], output_names=["out"], source=_SOURCE
    )


def uses_kernel(pool: mx.array) -> bool:
    """Whether gather_block_rows takes the CUDA kernel for this pool."""
    on_cuda = mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()
    return on_cuda and (pool.shape[-1] * pool.dtype.size) % VECTOR_BYTES == 0


def gather_block_rows(pools: Sequence[mx.array], table: mx.array, block_size: int) -> list[mx.array]:
    """For every pool, rows ``(J * heads, W * block_size, dim)`` holding, for each of the J block tables
    ``(J, W)``, its blocks' slots in order, one row per (sequence, head).

    One launch per pool: a single launch for many pools would need the pool pointers in an array
    each thread indexes, which CUDA keeps in per-thread local memory (ten times slower, measured).
    """
    table = table.astype(mx.int32)
    jobs, width = table.shape
    out = []
    for pool in pools:
        slots, heads, dim = pool.shape
        if not uses_kernel(pool):
            by_block = pool.reshape(slots // block_size, block_size, heads, dim)[table]  # (J, W, bs, H, D)
            rows = by_block.reshape(jobs, width * block_size, heads, dim).transpose(0, 2, 1, 3)
            out.append(rows.reshape(jobs * heads, width * block_size, dim))
            continue
        vecs = dim * pool.dtype.size // VECTOR_BYTES
        out.append(
            _cuda_kernel()(
                inputs=[pool, table],
                template=[("BLOCK", block_size), ("HEADS", heads), ("VECS", vecs)],
                grid=(width * block_size * vecs, jobs * heads, 1),
                threadgroup=(256, 1, 1),
                output_shapes=[(jobs * heads, width * block_size, dim)],
                output_dtypes=[pool.dtype],
            )[0]
        )
    return out


def load_block_rows(
    tables: Sequence[mx.array], pools: Sequence[mx.array], table: mx.array, rows: Sequence[int], block_size: int
) -> list[mx.array]:
    """For every pair of decode-row table ``(R * heads, C, dim)`` and pool, the table with row ``rows[j]``'s
    first ``min(W * block_size, C)`` columns (every head) replaced by block table ``j``'s tokens.

    Returns new arrays (the caller swaps them in). See the module docstring for the two paths.
    """
    table = table.astype(mx.int32)
    jobs, width = table.shape
    out = []
    row_job: mx.array | None = None
    consecutive = list(rows) == list(range(rows[0], rows[0] + len(rows)))
    for target, pool in zip(tables, pools):
        heads = pool.shape[1]
        capacity_rows, columns = target.shape[0] // heads, target.shape[1]
        loaded = min(width * block_size, columns)
        if uses_kernel(pool) and 2 * jobs * loaded >= capacity_rows * columns:
            if row_job is None:
                job_of = np.full(capacity_rows, -1, dtype=np.int32)
                job_of[np.asarray(rows)] = np.arange(jobs, dtype=np.int32)
                row_job = mx.array(job_of)
            vecs = pool.shape[-1] * pool.dtype.size // VECTOR_BYTES
            out.append(
                _table_kernel()(
                    inputs=[pool, table, row_job, target],
                    template=[("BLOCK", block_size), ("HEADS", heads), ("VECS", vecs)],
                    grid=(columns * vecs, capacity_rows * heads, 1),
                    threadgroup=(256, 1, 1),
                    output_shapes=[target.shape],
                    output_dtypes=[target.dtype],
                )[0]
            )
            continue
        gathered = gather_block_rows([pool], table, block_size)[0]
        if consecutive:
            targets: Any = slice(rows[0] * heads, (rows[0] + jobs) * heads)
        else:
            targets = mx.array(
                (np.asarray(rows)[:, None] * heads + np.arange(heads)[None, :]).reshape(-1).astype(np.int32)
            )
        target[targets, :loaded] = gathered[:, :loaded]
        out.append(target)
    return out


def compile_kernels(pools: Sequence[mx.array], block_size: int) -> None:
    """Run both CUDA kernels once per pool shape on one block, so their run-time compilation (about two
    seconds each on an H200) happens at start-up, not inside the first request that needs each path."""
    seen: set[tuple[int, int, Any]] = set()
    outputs = []
    for pool in pools:
        key = (pool.shape[1], pool.shape[2], pool.dtype)
        if key in seen or not uses_kernel(pool):
            continue
        seen.add(key)
        table = mx.zeros((1, 1), dtype=mx.int32)
        outputs += gather_block_rows([pool], table, block_size)
        rows = mx.zeros((2 * pool.shape[1], block_size, pool.shape[2]), dtype=pool.dtype)
        outputs += load_block_rows([rows], [pool], table, [0], block_size)
    if outputs:
        mx.eval(outputs)
