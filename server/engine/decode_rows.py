"""Contiguous KV rows for the decode batch, written back to the block pool in batches.

Gathering every row's context out of the slot pools each decode step copies
all of the batch's KV once per layer per token: at batch 32 that made decoding
a third slower than mlx-lm's contiguous cache. So each decode-ready sequence
gets a row of a per-layer array ``(rows * kv_heads, capacity, head_dim)``
(mlx-lm's BatchKVCache layout, viewed as ``(rows, heads, capacity, dim)``):

    admission to decode:  pool slots [0, n) --gather once--> row r, columns [0, n)
    every decode step:    new K/V -> row r, column n
    write-back:           row r, columns [pooled, n) --> the pool slots of those positions
    attention reads:      rows[:B, :, :max_len]  (a view, no copy)

The pool is the truth for everything but the newest columns of running rows:
the engine writes rows back every few steps and before a finished sequence's
blocks are pinned or freed, and hashes (shares) a block only once it is written
back. Writing every token through to the pool each step cost a scatter per layer
per step, and on CUDA, where MLX does not update an array in place while a
kernel that wrote it may still be running, each of those copied the whole
layer's pool. Rows of finished sequences become holes that new sequences fill
lowest-first; a hole in the middle of the batch is computed with a dummy token
and its output ignored.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import mlx.core as mx
import numpy as np

from server.engine.attention_mask import attention_mask, row_mask
from server.engine.block_gather import load_block_rows
from server.engine.paged_cache import KVStore
from server.engine.sequence import Sequence

ROW_GROWTH = 8
LENGTH_STEP = 256


def _key(seq: Sequence) -> tuple[str, int]:
    return seq.request_id, seq.index


class DecodeRows:
    """Row storage and row assignment for the sequences that decode."""

    def __init__(self, store: KVStore) -> None:
        self.store = store
        self.shape = store.shape
        self.capacity_rows = 0
        self.capacity_len = 0
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self.row_of: dict[tuple[str, int], int] = {}
        self.length: list[int] = []  # tokens held per row (0 for holes)
        self.pooled: list[int] = []  # per row: columns [0, pooled) are also in the pool
        self._previous_step: _DecodeStep | None = None  # the last step without holes (see _DecodeStep)
        self._row_indices: dict[tuple[int, int], mx.array] = {}  # (batch, heads) -> write rows

    # -- storage ------------------------------------------------------------------------------
    def _grow(self, rows: int, length: int) -> None:
        # the first table holds exactly the rows asked for (a lone request, or a batch starting together,
        # then fills it: see load_block_rows); later growth goes in steps of ROW_GROWTH rows
        new_rows = rows if not self.capacity_rows else max(self.capacity_rows, -(-rows // ROW_GROWTH) * ROW_GROWTH)
        new_len = max(self.capacity_len, -(-length // LENGTH_STEP) * LENGTH_STEP)
        if (new_rows, new_len) == (self.capacity_rows, self.capacity_len):
            return
        old_k, old_v = self.keys, self.values
        self.keys, self.values = [], []
        for layer, heads in enumerate(self.shape.kv_heads):
            for pools, olds, dim in (
                (self.keys, old_k, self.shape.k_dims[layer]),
                (self.values, old_v, self.shape.v_dims[layer]),
            ):
                grown = mx.zeros((new_rows * heads, new_len, dim), self.shape.dtype)
                if olds:
                    grown[: self.capacity_rows * heads, : self.capacity_len] = olds[layer]
                pools.append(grown)
        self.capacity_rows, self.capacity_len = new_rows, new_len
        self.length += [0] * (new_rows - len(self.length))
        self.pooled += [0] * (new_rows - len(self.pooled))
        mx.eval(self.keys, self.values)

    # -- rows ---------------------------------------------------------------------------------
    def _load(self, rows: list[int], tables: list[list[int]], counts: list[int]) -> None:
        """Copy the first `counts[i]` tokens of KV held by block table `tables[i]` into row `rows[i]`.

        One load per layer and K/V for all the rows together (a batch of 128 joining at once cost 128 x
        layers x 4 small ops one row at a time): see server/engine/block_gather.py. Every row gets the same
        number of blocks, a short one padded with copies of its own block; the columns past a row's count
        are never attended (its mask ends at its length) and its next steps overwrite them.
        """
        bs = self.store.block_size
        width = -(-max(counts) // bs)
        table = np.empty((len(tables), width), dtype=np.int32)
        for i, (blocks, count) in enumerate(zip(tables, counts)):
            own = blocks[: -(-count // bs)]
            table[i, : len(own)] = own
            table[i, len(own) :] = own[-1]
        block_table = mx.array(table)
        loaded = load_block_rows(
            [*self.keys, *self.values], [*self.store.keys, *self.store.values], block_table, rows, bs
        )
        layers = self.shape.num_layers
        self.keys, self.values = loaded[:layers], loaded[layers:]
        for row, count in zip(rows, counts):
            self.length[row] = self.pooled[row] = count

    def assign(self, seqs: Seq[Sequence], offsets: Seq[int]) -> list[int]:
        """Give every sequence a row holding its first `offsets[i]` tokens of KV; free everyone else's rows.

        A row holding more than asked keeps it (the extra column was written by a step that ran ahead
        with the same token, so it is valid) and is simply cut back.
        """
        wanted = {_key(s) for s in seqs}
        for key in [k for k in self.row_of if k not in wanted]:
            freed = self.row_of.pop(key)
            self.length[freed] = self.pooled[freed] = 0
        self._compact(len(seqs))
        used = set(self.row_of.values())
        free = (r for r in range(len(self.length) + len(seqs)) if r not in used)
        rows = []
        for seq in seqs:
            row = self.row_of.get(_key(seq))
            if row is None:
                row = next(free)
                self.row_of[_key(seq)] = row
            rows.append(row)
        self._grow(max(rows) + 1, max(offsets) + 1)
        joining = [
            (row, seq, offset)
            for seq, row, offset in zip(seqs, rows, offsets)
            if 0 < offset and self.length[row] < offset
        ]
        if joining:
            self._load([j[0] for j in joining], [j[1].block_ids for j in joining], [j[2] for j in joining])
        for row, offset in zip(rows, offsets):
            self.length[row] = offset
        return rows

    def _compact(self, batch: int) -> None:
        """Move rows down into the holes below `batch` when holes would be a quarter or more of the step.

        A step computes every row up to the highest one in use, holes included (a dummy token each), so
        once sequences that finished early leave holes under one that runs on, every step pays for rows
        nobody reads: on a CPU a step costs about the same for 3 live rows spread over 24 as for 24. A
        move copies whole rows (every layer, K and V) in one gather and one scatter per array.
        """
        if not self.row_of:
            return
        width = max(max(self.row_of.values()) + 1, batch)
        waste = width - batch
        if waste < 2 or 4 * waste < width:
            return
        used = set(self.row_of.values())
        holes = [r for r in range(batch) if r not in used]
        movers = sorted((r for r in used if r >= batch), reverse=True)
        moves = list(zip(movers, holes))  # every row at or above `batch` has a hole below it
        key_of = {row: key for key, row in self.row_of.items()}
        for src, dst in moves:
            self.row_of[key_of[src]] = dst
            self.length[dst], self.pooled[dst] = self.length[src], self.pooled[src]
            self.length[src] = self.pooled[src] = 0
        source = np.asarray([m[0] for m in moves])
        target = np.asarray([m[1] for m in moves])
        by_heads: dict[int, tuple[mx.array, mx.array]] = {}
        for layer, heads in enumerate(self.shape.kv_heads):
            if heads not in by_heads:
                expand = np.arange(heads)[None, :]
                by_heads[heads] = (
                    mx.array((source[:, None] * heads + expand).reshape(-1).astype(np.int32)),
                    mx.array((target[:, None] * heads + expand).reshape(-1).astype(np.int32)),
                )
            src_index, dst_index = by_heads[heads]
            for table in (self.keys, self.values):
                table[layer][dst_index] = table[layer][src_index]
        self._previous_step = None

    def unpooled(self, seq: Sequence) -> bool:
        """Whether the sequence's row holds computed tokens the pool does not have yet."""
        row = self.row_of.get(_key(seq))
        return row is not None and self.pooled[row] < seq.num_computed_tokens

    def write_back(self, seqs: Seq[Sequence], counts: Seq[int]) -> None:
        """Copy columns [pooled, counts[i]) of each sequence's row into the pool slots of those positions.

        One gather from the rows and one scatter into the pool per layer and K/V for all of them. A
        sequence without a row (it never decoded, or was preempted) is skipped.
        """
        bs = self.store.block_size
        rows, columns, slots = [], [], []
        for seq, count in zip(seqs, counts):
            row = self.row_of.get(_key(seq))
            if row is None or count <= self.pooled[row]:
                continue
            assert count <= min(self.length[row], len(seq.block_ids) * bs), "writing back KV the row does not hold"
            positions = np.arange(self.pooled[row], count)
            rows.append(np.full(len(positions), row))
            columns.append(positions)
            slots.append(np.asarray(seq.block_ids)[positions // bs] * bs + positions % bs)
            self.pooled[row] = count
        if not rows:
            return
        row_of_token, column_of_token = np.concatenate(rows), np.concatenate(columns)
        slot_index = mx.array(np.concatenate(slots).astype(np.int32))
        by_heads: dict[int, tuple[mx.array, mx.array]] = {}  # (row*heads + head, column) per (token, head)
        for layer, heads in enumerate(self.shape.kv_heads):
            if heads not in by_heads:
                host_rows = (row_of_token[:, None] * heads + np.arange(heads)[None, :]).reshape(-1)
                by_heads[heads] = (
                    mx.array(host_rows.astype(np.int32)),
                    mx.array(np.repeat(column_of_token, heads).astype(np.int32)),
                )
            flat_rows, flat_columns = by_heads[heads]
            for table, pools in ((self.keys, self.store.keys), (self.values, self.store.values)):
                # indexing the rows as stored (no transposed view, which MLX would copy whole first)
                pools[layer][slot_index] = table[layer][flat_rows, flat_columns].reshape(len(row_of_token), heads, -1)
        mx.async_eval(self.store.keys, self.store.values)

    def step_caches(self, rows: list[int]) -> tuple[list[Any], list[int]]:
        """Cache objects for one decode step over rows 0..max(rows), and the token order to feed."""
        width = max(rows) + 1
        order = [-1] * width
        for i, row in enumerate(rows):
            order[row] = i
        offsets = [self.length[r] if order[r] >= 0 else 0 for r in range(width)]
        previous, self._previous_step = self._previous_step, None
        following = previous is not None and previous.follows(offsets)
        device_offsets = previous.device_offsets + 1 if previous is not None and following else None
        step = _DecodeStep(offsets, device_offsets, self._row_indices)
        if -1 not in order:
            self._previous_step = step
        for r in rows:
            self.length[r] += 1
        return [RowLayerCache(self, layer, step) for layer in range(self.shape.num_layers)], order


class _DecodeStep:
    """One decode step's positions, and the arrays every layer shares: RoPE offsets, mask, write indices.

    On CUDA an array made from host memory is paged onto the device when a kernel first reads it, and
    a step made five of them (offsets, mask, the write indices): a synced Llama-1B forward at batch 32
    on an H200 took 6.78 ms with them, 5.47 ms without. So the per-step arrays are computed on the
    device from an offsets array that, in a batch whose rows all advanced by one since the previous
    step (steady decoding), is the previous step's plus one; the write rows are cached per batch width.
    """

    def __init__(
        self, offsets: list[int], device_offsets: mx.array | None, row_indices: dict[tuple[int, int], mx.array]
    ) -> None:
        self.offsets = offsets
        self.width = max(offsets) + 1
        self._masks: dict[int | None, Any] = {}
        self.derived = device_offsets is not None  # offsets computed on the device from the previous step's
        self.device_offsets = device_offsets if device_offsets is not None else mx.array(offsets, dtype=mx.int32)
        self.offset: int | mx.array = offsets[0] if len(offsets) == 1 else self.device_offsets
        self._row_indices = row_indices
        self._indices: dict[int, tuple[mx.array, mx.array]] = {}

    def follows(self, offsets: list[int]) -> bool:
        """Whether `offsets` are this step's, every row one further."""
        return len(offsets) == len(self.offsets) and all(a == b + 1 for a, b in zip(offsets, self.offsets))

    def indices(self, heads: int) -> tuple[mx.array, mx.array]:
        """(row*heads + head, column) for every (row, head): where this step's K/V land in the rows."""
        found = self._indices.get(heads)
        if found is None:
            batch = len(self.offsets)
            rows = self._row_indices.get((batch, heads))
            if rows is None:
                rows = mx.array(
                    (np.arange(batch)[:, None] * heads + np.arange(heads)[None, :]).reshape(-1).astype(np.int32)
                )
                self._row_indices[(batch, heads)] = rows
            found = (rows, mx.repeat(self.device_offsets, heads))
            self._indices[heads] = found
        return found

    def mask(self, window_size: int | None) -> Any:
        if window_size not in self._masks:
            if len(self.offsets) == 1:  # mlx-lm's own masks for one row (see attention_mask)
                self._masks[window_size] = attention_mask(self.offsets, 1, window_size)
            else:  # (B, 1, 1, width): key j visible to row r's query at offsets[r], computed on the device
                self._masks[window_size] = row_mask(self.device_offsets, 1, self.width, window_size)
        return self._masks[window_size]


class RowLayerCache:
    """One layer's decode step in mlx-lm's cache protocol: write row columns, read views."""

    def __init__(self, rows: DecodeRows, layer: int, step: _DecodeStep) -> None:
        self.rows = rows
        self.layer = layer
        self.step = step

    @property
    def offset(self) -> int | mx.array:
        return self.step.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        batch, heads, _, _ = keys.shape
        step, rows = self.step, self.rows
        row_index, column = step.indices(heads)
        out = []
        for new, table in ((keys, rows.keys), (values, rows.values)):
            table[self.layer][row_index, column] = new.reshape(batch * heads, -1)
            view = table[self.layer].reshape(rows.capacity_rows, heads, rows.capacity_len, -1)
            out.append(view[:batch, :, : step.width, :])
        return out[0], out[1]

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        mask = self.step.mask(window_size)
        if mask is None and return_array:
            return mx.ones((1, 1, 1, self.step.width), dtype=mx.bool_)
        return mask

    def is_trimmable(self) -> bool:
        return False

    # see PagedLayerCache.keys: a pipeline-parallel model ties the hidden state it sends on to these
    @property
    def keys(self) -> mx.array:
        return self.rows.keys[self.layer]

    @keys.setter
    def keys(self, value: mx.array) -> None:
        self.rows.keys[self.layer] = value

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.rows.keys[self.layer], self.rows.values[self.layer]
