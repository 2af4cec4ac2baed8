"""Which cached keys each new query may attend to: the one causal (optionally sliding-window) mask of the
engine's KV caches, for a prefill chunk over paged blocks (`paged_cache.py`) and for a decode step over
rows (`decode_rows.py`) alike.

Keys are left-aligned: row r's key j is the token at position j of that sequence, so a query at
position p sees keys j <= p (and j > p - window with a sliding window). Positions beyond a row's length
are never visible, which is what makes one padded (B, width) key tensor serve rows of different lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx


def visible_keys(query_positions: mx.array, width: int, window_size: int | None) -> mx.array:
    """(B, n, width) booleans: may the query at `query_positions[b, i]` see key j of row b."""
    keys = mx.arange(width, dtype=mx.int32)[None, None, :]
    query = query_positions.astype(mx.int32)[:, :, None]
    visible = keys <= query
    if window_size is not None:
        visible = mx.logical_and(visible, keys > query - window_size)
    return visible


def attention_mask(offsets: Sequence[int], num_new: int, window_size: int | None, width: int | None = None) -> Any:
    """The mask for rows that already hold `offsets[r]` tokens and feed `num_new` more, over `width` keys
    (default: the widest row's; wider keys are padding no query sees).

    A single row over exactly its own keys uses mlx-lm's own masks ("causal" for a chunk, None for one
    token), which keeps greedy output identical to mlx_lm.generate; anything else gets a boolean
    (B, 1, n, width) mask.
    """
    natural = max(offsets) + num_new
    width = natural if width is None else width
    if len(offsets) == 1 and width == natural and (window_size is None or width <= window_size):
        return "causal" if num_new > 1 else None
    return row_mask(mx.array(list(offsets), dtype=mx.int32), num_new, width, window_size)


def row_mask(offsets: mx.array, num_new: int, width: int, window_size: int | None) -> mx.array:
    """(B, 1, n, width) for rows holding `offsets` (a device array: no host round trip) and feeding `num_new`."""
    positions = offsets[:, None] + mx.arange(num_new, dtype=mx.int32)[None, :]
    return visible_keys(positions, width, window_size)[:, None, :, :]
