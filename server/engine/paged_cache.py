"""KV bytes in MLX: the per-layer slot pools, and the cache objects mlx-lm's models call each step.

Every layer has one K and one V array of shape ``(num_blocks * block_size,
kv_heads, head_dim)``: slot ``block * block_size + i`` holds token ``i`` of
that block. A step writes its new K/V by scatter (in place: MLX donates the
pool buffer) and reads each row's context by gathering its slots:

    row r:  block table [4, 9]   positions 0..19 (block_size 16)
            slots = [64..79, 144..147]  -> gather -> (S, H, D) per row

``PagedLayerCache`` speaks mlx-lm's cache protocol (``offset``,
``update_and_fetch``, ``make_mask``), so model code runs unchanged. A single
row gets exactly the keys it needs and mlx-lm's own masks ("causal" for a
chunk, none for one token), which keeps greedy output equal to
``mlx_lm.generate``; several rows get a boolean mask hiding padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from server.engine.attention_mask import attention_mask, row_mask


@dataclass(frozen=True)
class KVShape:
    """What one token's KV looks like in every layer (probed from the model)."""

    num_layers: int
    kv_heads: tuple[int, ...]
    k_dims: tuple[int, ...]
    v_dims: tuple[int, ...]
    dtype: Any

    @property
    def bytes_per_token(self) -> int:
        size = self.dtype.size
        return sum(h * (k + v) * size for h, k, v in zip(self.kv_heads, self.k_dims, self.v_dims))


def probe_kv_shape(model: Any) -> KVShape:
    """Run one token through the model with mlx-lm's own cache and read the shapes it stored."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    # evaluating the probe also materializes arrays models build lazily (Llama 3's RoPE frequencies),
    # which must not be left as graphs tied to this thread's stream for the engine thread to trip on
    mx.eval(model(mx.array([[0]]), cache=cache), [c.state for c in cache])
    heads, k_dims, v_dims = [], [], []
    dtype = None
    for layer_cache in cache:
        keys, values = getattr(layer_cache, "keys", None), getattr(layer_cache, "values", None)
        if not isinstance(keys, mx.array) or not isinstance(values, mx.array):
            raise ValueError(
                f"unsupported cache type {type(layer_cache).__name__}: only attention KV caches "
                "can be paged (SSM / linear-attention layers are not supported yet)"
            )
        heads.append(keys.shape[1])
        k_dims.append(keys.shape[3])
        v_dims.append(values.shape[3])
        dtype = keys.dtype
    return KVShape(len(cache), tuple(heads), tuple(k_dims), tuple(v_dims), dtype)


class KVStore:
    """The K and V slot pools of every layer."""

    @classmethod
    def for_model(cls, model: Any, block_size: int, kv_cache_gb: float, num_blocks: int | None = None) -> KVStore:
        """The model's store: `num_blocks` blocks, else as many as `kv_cache_gb` holds. On rank 0 of a world it
        holds rank 0's share of every block; the other ranks take its block count (follower.py)."""
        shape = probe_kv_shape(model)
        count = num_blocks or max(1, int(kv_cache_gb * (1 << 30)) // (shape.bytes_per_token * block_size))
        return cls(shape, count, block_size)

    def __init__(self, shape: KVShape, num_blocks: int, block_size: int) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        # one block past the pool's, owned by no sequence: padding tokens of a batched prefill write there
        self.scratch_block = num_blocks
        slots = (num_blocks + 1) * block_size
        self.keys = [mx.zeros((slots, h, d), shape.dtype) for h, d in zip(shape.kv_heads, shape.k_dims)]
        self.values = [mx.zeros((slots, h, d), shape.dtype) for h, d in zip(shape.kv_heads, shape.v_dims)]
        mx.eval(self.keys, self.values)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def copy_slots(self, src_block: int, dst_block: int, count: int) -> None:
        """Copy the first `count` token slots of one block into another, in every layer."""
        bs = self.block_size
        src = mx.arange(src_block * bs, src_block * bs + count)
        dst = mx.arange(dst_block * bs, dst_block * bs + count)
        # gather into fresh buffers first: assigning a view of the pool into the pool would keep MLX
        # from updating it in place and copy the whole pool instead
        parts = [pool[src] for pool in (*self.keys, *self.values)]
        mx.eval(parts)
        for pool, part in zip((*self.keys, *self.values), parts):
            pool[dst] = part
        mx.eval(self.keys, self.values)


def slot_ids(block_table: Sequence[int], start: int, stop: int, block_size: int) -> np.ndarray:
    """Slots of positions start..stop-1 for one row."""
    positions = np.arange(start, stop)
    table = np.asarray(block_table, dtype=np.int64)
    return (table[positions // block_size] * block_size + positions % block_size).astype(np.int32)


@dataclass
class StepLayout:
    """Where one forward step writes and reads, shared by every layer's cache object.

    Every row feeds the same number of new tokens (`num_new`); row r already has
    `offsets[r]` tokens of KV. A row with fewer real tokens (`counts[r]`) is padded: its padding
    positions write to and read from the scratch block, never its own slots, and no real token
    attends to them (they come after it). A `width` beyond the widest row pads every row's keys
    with scratch columns, which the mask hides (a bucketed shape, see prefill_buckets.py).
    """

    offsets: list[int]
    num_new: int
    block_tables: list[list[int]]
    block_size: int
    counts: list[int] | None = None  # real tokens per row (default: all num_new)
    scratch_block: int | None = None  # KVStore.scratch_block, needed when a count is short
    width: int | None = None  # keys each row reads (default: the widest row's offset + num_new)
    write_slots: mx.array = field(init=False)
    read_slots: mx.array = field(init=False)
    _masks: dict[int | None, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        bs, n = self.block_size, self.num_new
        counts = self.counts or [n] * len(self.offsets)
        natural = max(self.offsets) + n
        width = self.width = natural if self.width is None else self.width
        if width < natural:
            raise ValueError(f"a step's key width {width} is below its widest row's {natural}")
        if (any(c < n for c in counts) or width > natural) and self.scratch_block is None:
            raise ValueError("padded rows need the store's scratch block")
        scratch = (self.scratch_block or 0) * bs + np.arange(max(n, width)) % bs
        writes = []
        reads = np.zeros((len(self.offsets), width), dtype=np.int32)
        for r, (table, offset, count) in enumerate(zip(self.block_tables, self.offsets, counts)):
            real = slot_ids(table, 0, offset + count, bs)
            writes += [real[offset:], scratch[count:n]]
            reads[r, : offset + count] = real
            reads[r, offset + count : offset + n] = scratch[count:n]
            reads[r, offset + n :] = scratch[offset + n : width]
        self.write_slots = mx.array(np.concatenate(writes).astype(np.int32))
        self.read_slots = mx.array(reads)

    @property
    def batch_size(self) -> int:
        return len(self.offsets)

    @property
    def offset(self) -> int | mx.array:
        return self.offsets[0] if self.batch_size == 1 else mx.array(self.offsets)

    def mask(self, window_size: int | None) -> Any:
        if window_size not in self._masks:
            self._masks[window_size] = self._build_mask(window_size)
        return self._masks[window_size]

    def _build_mask(self, window_size: int | None) -> Any:
        return attention_mask(self.offsets, self.num_new, window_size, self.width)


class PagedLayerCache:
    """One layer's view of a step: mlx-lm's cache protocol over the slot pools."""

    def __init__(self, store: KVStore, layer: int, layout: StepLayout) -> None:
        self.store = store
        self.layer = layer
        self.layout = layout

    @property
    def offset(self) -> int | mx.array:
        return self.layout.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        batch, heads, n, _ = keys.shape
        layout = self.layout
        k_pool, v_pool = self.store.keys[self.layer], self.store.values[self.layer]
        k_pool[layout.write_slots] = keys.transpose(0, 2, 1, 3).reshape(batch * n, heads, -1)
        v_pool[layout.write_slots] = values.transpose(0, 2, 1, 3).reshape(batch * n, heads, -1)
        return (k_pool[layout.read_slots].transpose(0, 2, 1, 3), v_pool[layout.read_slots].transpose(0, 2, 1, 3))

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        mask = self.layout.mask(window_size)
        if return_array and isinstance(mask, str) or (return_array and mask is None and n > 1):
            return self._array_mask(window_size)
        return mask

    def _array_mask(self, window_size: int | None) -> mx.array:
        offset, n = self.layout.offsets[0], self.layout.num_new
        return row_mask(mx.array([offset], dtype=mx.int32), n, offset + n, window_size)[0, 0]

    # mlx-lm checks these on some code paths; a paged cache is neither trimmable nor quantized
    def is_trimmable(self) -> bool:
        return False

    # a pipeline-parallel mlx-lm model ties the hidden state a rank sends on to its last layer's keys
    # (`cache[-1].keys = mx.depends(cache[-1].keys, h)`), so that evaluating the KV runs the send
    @property
    def keys(self) -> mx.array:
        return self.store.keys[self.layer]

    @keys.setter
    def keys(self, value: mx.array) -> None:
        self.store.keys[self.layer] = value

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.store.keys[self.layer], self.store.values[self.layer]


def step_caches(store: KVStore, layout: StepLayout) -> list[PagedLayerCache]:
    return [PagedLayerCache(store, layer, layout) for layer in range(store.shape.num_layers)]
