"""Whole KV blocks copied out of a slot pool into decode-row layout, in one pass.

A pool is ``(num_blocks * block_size, heads, dim)`` (token-major, see paged_cache.py); a decode row
is ``(heads, columns, dim)`` (mlx-lm's cache layout, see decode_rows.py). Turning J sequences'
block tables ``(J, W)`` into ``(J * heads, W * block_size, dim)`` is a gather of whole blocks plus a
transpose. With MLX ops that is two copies, and MLX's CUDA gather moves about 170 GB/s on an H100
(element by element): 9 ms for a 8,192-token sequence of a 48-layer model. On CUDA this module
runs one kernel instead, every thread moving 16 bytes straight from the pool slot to its place in
the row; everywhere else (CPU, Metal, head sizes that are not a multiple of 16 bytes) it uses the
MLX ops, which give the same result.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

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


@functools.cache
def _cuda_kernel() -> Any:
    return mx.fast.cuda_kernel(name="kv_block_rows", input_names=["pool", "table"], output_names=["out"],
                               source=_SOURCE)


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
        out.append(_cuda_kernel()(
            inputs=[pool, table],
            template=[("BLOCK", block_size), ("HEADS", heads), ("VECS", vecs)],
            grid=(width * block_size * vecs, jobs * heads, 1), threadgroup=(256, 1, 1),
            output_shapes=[(jobs * heads, width * block_size, dim)], output_dtypes=[pool.dtype])[0])
    return out
