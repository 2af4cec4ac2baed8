"""The model runner: turns a step's prefill chunks and decode batch into forward passes.

Prefill chunks run batched over the paged pool (rows of similar width
together, in forwards of equal length; a chunk that wants prompt logprobs runs
alone), through the model's body when it has one (no vocabulary projection for
tokens whose logits nobody reads); the decode batch runs every decode-ready sequence as one
(B, 1) forward over contiguous rows (see decode_rows.py) and returns the last
logits. Like ``mlx_lm.generate``, a prompt's
last token is fed by its first decode step, never by prefill.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import mlx.core as mx

from server.engine import host
from server.engine.block_gather import compile_kernels
from server.engine.decode_rows import DecodeRows
from server.engine.paged_cache import KVStore, StepLayout, step_caches
from server.engine.prefill_buckets import PrefillShape, padded_shape
from server.engine.sequence import Sequence

log = logging.getLogger(__name__)

PromptLogprob = tuple[int, float, list[tuple[int, float]]]  # token id, its logprob, top alternatives


def _body_of(model: Any) -> Any | None:
    """The model's transformer body if it takes mlx-lm's `cache` argument, else None."""
    body = getattr(model, "model", None)
    if body is None or not callable(body):
        return None
    try:
        params = inspect.signature(body.__call__).parameters
    except (TypeError, ValueError):
        return None
    return body if "cache" in params else None


class ModelRunner:
    """Runs forward passes of one mlx-lm model over the paged KV store; the KV manager's KVStorage."""

    def __init__(self, model: Any, store: KVStore, prefill_buckets: bool = False) -> None:
        """With `prefill_buckets`, batched prefill forwards are padded to bucket shapes (prefill_buckets.py)."""
        self.model = model
        self.store = store
        self.prefill_buckets = prefill_buckets
        self.shapes_run: set[PrefillShape] = set()  # bucket shapes this runner ran (start-up's included)
        self.shapes_built_serving = 0  # bucket shapes first run while serving (each built then, on CUDA)
        self._body = _body_of(model)
        self.rows = DecodeRows(store)
        compile_kernels([*store.keys, *store.values], store.block_size)

    # -- KVStorage (see kv_manager.py): the storage side of the KV manager's block bookkeeping --------
    def copy_prefix(self, src_block: int, dst_block: int, num_slots: int) -> None:
        """Copy-on-write of a partial block: its first num_slots token slots, in every layer."""
        self.store.copy_slots(src_block, dst_block, num_slots)

    def has_unwritten(self, seq: Sequence) -> bool:
        """Whether seq's decode row holds computed tokens the pool does not have yet."""
        return self.rows.unpooled(seq)

    def write_back(self, seqs: Seq[Sequence], counts: Seq[int]) -> None:
        """Copy decode rows' columns the pool lacks, up to counts[i], into seqs[i]'s blocks."""
        self.rows.write_back(seqs, counts)

    def _sync_pools(self, *outputs: mx.array) -> None:
        mx.eval(*outputs, self.store.keys, self.store.values)

    def prefill(self, seq: Sequence, num_tokens: int) -> list[PromptLogprob]:
        """Compute KV for the next num_tokens of seq (never its last token).

        With `prompt_logprobs` asked, also return the logprob (and top alternatives) of each
        following prompt token under the model, from this chunk's logits.
        """
        start = seq.num_computed_tokens
        assert start + num_tokens <= seq.num_tokens - 1, "prefill must leave the last token to decode"
        tokens = seq.token_ids[start : start + num_tokens]
        layout = StepLayout([start], num_tokens, [seq.block_ids], self.store.block_size)
        alternatives = seq.params.prompt_logprobs
        if alternatives is None:
            forward = self._body if self._body is not None else self.model
            self._sync_pools(forward(mx.array([tokens], dtype=mx.int32), cache=step_caches(self.store, layout)))
            return []
        logits = self.model(mx.array([tokens], dtype=mx.int32), cache=step_caches(self.store, layout))[0]
        logprobs = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
        targets = mx.array([seq.token_at(start + j + 1) for j in range(num_tokens)])
        chosen = mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
        top = mx.argsort(-logprobs, axis=-1)[:, :alternatives] if alternatives else None
        top_values = mx.take_along_axis(logprobs, top, axis=-1) if top is not None else None
        if top is not None and top_values is not None:
            self._sync_pools(chosen, top, top_values)
            ids, values = host.int_rows(top), host.float_rows(top_values)
        else:
            self._sync_pools(chosen)
            ids, values = [[] for _ in range(num_tokens)], [[] for _ in range(num_tokens)]
        return [(t, lp, list(zip(i, v))) for t, lp, i, v in zip(host.ints(targets), host.floats(chosen), ids, values)]

    def prefill_rows(self, chunks: Seq[tuple[Sequence, int]]) -> None:
        """Compute KV for several sequences' next chunks (none asking for prompt logprobs), batched.

        Rows of similar context width are grouped (see `prefill_groups`), and a group's rows of similar
        chunk length run as one forward, the shorter chunks padded to the longest (see `padded_batches`:
        feeding every row the shortest chunk first and the rest in further forwards cost a whole forward
        over every row's context per distinct length, and agents' turns all differ by a few tokens).
        Each forward is launched on its own, everything synced once at the end. A forward of one row
        runs exactly as `prefill` does (mlx-lm's causal mask).
        """
        outputs = []
        for group in prefill_groups(chunks):
            for batch in padded_batches(group):
                outputs.append(self._forward_chunks(batch))
                # launched now, not chained into one graph with the next forward: that one's scatter into
                # the pools could not reuse their buffers while this one's reads still hold them, and
                # would copy every layer's whole pool
                mx.async_eval(outputs[-1], self.store.keys, self.store.values)
        if outputs:
            self._sync_pools(*outputs)

    def _forward_chunks(self, batch: Seq[tuple[Sequence, int]]) -> mx.array:
        """Build one prefill forward of the batch's chunks, padded to the longest (and, with buckets, to its
        bucket shape: extra rows of padding only)."""
        starts = [seq.num_computed_tokens for seq, _ in batch]
        for (seq, n), start in zip(batch, starts):
            assert start + n <= seq.num_tokens - 1, "prefill must leave the last token to decode"
        rows = [seq.token_ids[start : start + n] for (seq, n), start in zip(batch, starts)]
        tables = [seq.block_ids for seq, _ in batch]
        step = max(n for _, n in batch)
        width = max(starts) + step
        if self.prefill_buckets:
            shape = padded_shape(len(rows), step, width)
            if shape not in self.shapes_run:
                self.shapes_run.add(shape)
                self.shapes_built_serving += 1
                log.info(
                    "prefill shape %d rows x %d tokens over %d keys run for the first time (not run at start-up)",
                    shape.rows,
                    shape.tokens,
                    shape.width,
                )
            step, width = shape.tokens, shape.width
            extra = shape.rows - len(rows)
            rows, starts, tables = rows + [[]] * extra, starts + [0] * extra, tables + [[]] * extra
        return self._forward_padded(rows, starts, step, tables, width)

    def _forward_padded(
        self, rows: list[list[int]], starts: list[int], step: int, tables: list[list[int]], width: int
    ) -> mx.array:
        """One forward of `step` positions per row: row r feeds rows[r] (padded with token 0, its padding
        written to the scratch block) after its starts[r] tokens of KV, its keys padded to `width`."""
        forward = self._body if self._body is not None else self.model
        tokens = mx.array([row + [0] * (step - len(row)) for row in rows], dtype=mx.int32)
        layout = StepLayout(
            starts,
            step,
            tables,
            self.store.block_size,
            counts=[len(row) for row in rows],
            scratch_block=self.store.scratch_block,
            width=width,
        )
        return forward(tokens, cache=step_caches(self.store, layout))

    def warm_prefill(self, shapes: Seq[PrefillShape]) -> None:
        """Run one forward of each shape, every row padding (only the scratch block is written), so a
        device builds what it builds per shape before any request needs it."""
        for shape in shapes:
            self.shapes_run.add(shape)
            rows: list[list[int]] = [[] for _ in range(shape.rows)]
            self._sync_pools(self._forward_padded(rows, [0] * shape.rows, shape.tokens, rows, shape.width))

    def _forward_rows(self, seqs: Seq[Sequence], offsets: list[int], inputs: mx.array | list[int]) -> mx.array:
        """Build (not evaluate) one decode step: seqs[i] feeds inputs[i] at position offsets[i]."""
        rows = self.rows.assign(seqs, offsets)
        caches, order = self.rows.step_caches(rows)
        if isinstance(inputs, mx.array):
            tokens = inputs[mx.array([max(i, 0) for i in order])][:, None]  # holes feed a copy of row 0's token
        else:
            tokens = mx.array([[inputs[i]] if i >= 0 else [0] for i in order], dtype=mx.int32)
        logits = self.model(tokens, cache=caches)[:, -1, :]
        if rows != list(range(len(rows))):
            logits = logits[mx.array(rows)]
        return logits

    def decode(self, seqs: Seq[Sequence]) -> mx.array:
        """Feed each sequence's next uncomputed token; return (B, V) logits in seqs' order, evaluated."""
        offsets = [s.num_computed_tokens for s in seqs]
        logits = self._forward_rows(seqs, offsets, [s.token_at(o) for s, o in zip(seqs, offsets)])
        mx.eval(logits, self.rows.keys, self.rows.values)  # decode writes the rows only (see decode_rows.py)
        return logits

    def decode_ahead(self, seqs: Seq[Sequence], tokens: mx.array) -> mx.array:
        """Launch the step after the current one without waiting for its tokens on the host.

        `tokens` are the greedy tokens the current step sampled (still on the device); the step
        feeds them one position further and returns its own greedy tokens, evaluating
        asynchronously while the host handles the current step's output (mlx-lm's overlap).
        """
        offsets = [s.num_computed_tokens + 1 for s in seqs]
        logits = self._forward_rows(seqs, offsets, tokens)
        following = greedy_tokens(logits)
        mx.async_eval(following, self.rows.keys, self.rows.values)
        return following


def prefill_groups(chunks: Seq[tuple[Sequence, int]], waste: float = 1.5) -> list[list[tuple[Sequence, int]]]:
    """Split prefill chunks into groups that run batched.

    A batched forward reads every row's keys up to the widest row (offset + chunk), so a short fresh
    prompt batched with a long resumed conversation would attend over, and copy, thousands of padding
    columns. Rows are taken in order of width and a group closes when its padded area (rows x widest)
    would exceed `waste` times the area its rows need.
    """
    return _split_padded(chunks, lambda c: c[0].num_computed_tokens + c[1], waste, longest_first=False)


def padded_batches(group: Seq[tuple[Sequence, int]], waste: float = 1.5) -> list[list[tuple[Sequence, int]]]:
    """Split a group's chunks into forwards padded to their longest chunk.

    Chunks are taken longest first, and a forward closes when its padded tokens (rows x longest)
    would exceed `waste` times its real ones: a 512-token chunk never pads a 3-token one.
    """
    return _split_padded(group, lambda c: c[1], waste, longest_first=True)


def _split_padded(
    items: Seq[tuple[Sequence, int]], size: Callable[[tuple[Sequence, int]], int], waste: float, longest_first: bool
) -> list[list[tuple[Sequence, int]]]:
    """Items in order of size, cut into runs whose padded size (items x largest) stays within `waste`
    times their summed sizes."""
    runs: list[list[tuple[Sequence, int]]] = []
    total = largest = 0
    for item in sorted(items, key=size, reverse=longest_first):
        n = size(item)
        if runs and (len(runs[-1]) + 1) * max(largest, n) <= waste * (total + n):
            runs[-1].append(item)
            total, largest = total + n, max(largest, n)
        else:
            runs.append([item])
            total = largest = n
    return runs


def greedy_tokens(logits: mx.array) -> mx.array:
    """Argmax per row, computed as sample_batch's greedy path does (float32)."""
    return mx.argmax(logits.astype(mx.float32), axis=-1)
