"""Prefill shapes padded to a few buckets, and the bucket shapes a fresh burst can take (run once at start-up).

On CUDA, MLX runs prefill attention through cuDNN, which builds (plans, compiles) one graph per exact
(rows, new tokens, key width) shape and caches it (`MLX_CUDA_SDPA_CACHE_SIZE` graphs per thread).
Building one costs 50 ms to over a second on an H100 (bench/README.md, "First-seen prefill shapes"),
and a server's admissions make a new shape out of almost every burst: agents' turns and prompts all
differ by a few tokens. Padding each prefill forward's rows, tokens and key width up to the next
value of the series 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (each at most 1.5x the last, so padding costs at
most 1.5x per dimension) leaves a few dozen shapes, and running every shape a burst of fresh prompts
can take once, before the engine serves, moves their cost out of every request's time to first token.
Keys are padded further, to at least the chunk's tokens plus PREFIX_ROOM: chunks that find up to that
many tokens already in the KV cache (the chat template's system header, prompts sharing a beginning,
a prompt's earlier chunk) run in the same shape as fresh ones, for attention over up to 64 more keys
(1.5x at most, after the bucket). Without it every cached prefix length made shapes of their own: a
trickled burst of 256 chat prompts, replayed on a CPU, ran two that start-up had not (bench/README.md,
fifth pass). A longer shared prefix (a long system prompt) adds its own set at start-up
(`warm_shapes`); wider keys of later turns (a conversation's context) are bucketed and built on first
use.

Padding rows feed token 0 into the KV store's scratch block, padded key columns read it, and the mask
hides both from every real token (paged_cache.StepLayout), so results do not change. On CPUs and Metal,
where a new shape costs nothing extra (measured here: 0.96-1.03x), padding would only add work: the
engine buckets on CUDA unless told otherwise (EngineConfig.prefill_buckets, `--prefill-buckets`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from server.engine.config import EngineConfig

MIN_TOKENS = 16  # fewer new tokens than this are padded to it: a 16-token forward costs what a 5-token one does
PREFIX_ROOM = 64  # keys every padded forward has beyond its tokens: cached prefixes up to this change no shape
SDPA_CACHE_VARIABLE = "MLX_CUDA_SDPA_CACHE_SIZE"
SDPA_CACHE_SIZE = 2048  # cuDNN graphs kept per thread (MLX's default, 256, is below the warm shapes alone)


def bucket(n: int, floor: int = 1) -> int:
    """The smallest value of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times them) that is
    at least n and at least floor."""
    if n <= floor:
        return floor
    power = 1 << (n - 1).bit_length()  # the smallest power of two >= n
    three_quarters = power // 4 * 3  # 3 * 2^k, between power / 2 and power
    return three_quarters if power >= 4 and three_quarters >= n else power


@dataclass(frozen=True)
class PrefillShape:
    """One padded prefill forward: `rows` rows of `tokens` new tokens each, attending over `width` keys."""

    rows: int
    tokens: int
    width: int


def padded_shape(rows: int, tokens: int, width: int) -> PrefillShape:
    """The bucket a forward of `rows` rows, `tokens` new tokens (the longest chunk) and `width` keys (the
    widest row's context) runs as: keys at least the padded tokens plus PREFIX_ROOM."""
    padded_tokens = bucket(tokens, MIN_TOKENS)
    keys = max(width + padded_tokens - tokens, padded_tokens + PREFIX_ROOM)
    return PrefillShape(bucket(rows), padded_tokens, bucket(keys))


def fresh_shapes(max_rows: int, budget: int) -> list[PrefillShape]:
    """Every bucket a burst of new prompts can prefill in: rows up to `max_rows` (the engine's sequences),
    chunks up to `budget` tokens (its prefill chunk), at most about 3.4 budgets of padded tokens per forward
    (the scheduler's budget, padded_batches' 1.5x, then a bucket in each dimension); no context before the
    chunk, so the key width is the chunk's."""
    limit = budget * 27 // 8
    shapes = []
    tokens = MIN_TOKENS
    while tokens <= bucket(budget, MIN_TOKENS):
        rows = 1
        while rows <= bucket(max_rows) and rows * tokens <= limit:
            shapes.append(padded_shape(rows, tokens, tokens))
            rows = bucket(rows + 1)
        tokens = bucket(tokens + 1)
    return shapes


def after_prefix(shapes: list[PrefillShape], cached: int) -> list[PrefillShape]:
    """The shapes of the same chunks when each row already holds `cached` tokens (a shared prompt prefix
    found in the KV cache): the same rows and tokens over keys wide enough (the same shapes up to PREFIX_ROOM)."""
    return [padded_shape(s.rows, s.tokens, cached + s.tokens) for s in shapes]


def template_prefix(tokenizer: Any) -> int:
    """How many tokens every chat prompt the tokenizer's chat template renders starts with (its system
    header: a default system prompt, a date line), 0 when it has no template or rendering fails."""
    try:
        one, two = (
            tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            for text in ("a", "b")
        )
    except Exception:
        return 0
    if not (isinstance(one, list) and isinstance(two, list)):
        return 0
    same = 0
    while same < min(len(one), len(two)) and one[same] == two[same]:
        same += 1
    return same


def warm_shapes(max_rows: int, budget: int, shared_prefix: int, block_size: int) -> list[PrefillShape]:
    """What an engine runs at start-up: every fresh burst's shapes, and (when its chat template gives every
    prompt more than PREFIX_ROOM `shared_prefix` tokens) the same bursts after the prefix's full blocks are
    found cached."""
    shapes = fresh_shapes(max_rows, budget)
    cached = shared_prefix // block_size * block_size
    if cached:
        fresh = set(shapes)
        shapes += [s for s in after_prefix(shapes, cached) if s not in fresh]
    return shapes


def keep_enough_attention_graphs() -> None:
    """Raise MLX's per-thread cache of cuDNN attention graphs to SDPA_CACHE_SIZE unless the user set it
    (read when a thread first runs attention, so call this before the engine's thread starts)."""
    os.environ.setdefault(SDPA_CACHE_VARIABLE, str(SDPA_CACHE_SIZE))


def buckets_on(config: EngineConfig) -> bool:
    """Whether an engine of this config buckets its prefill shapes: as configured, else on CUDA only."""
    if config.prefill_buckets is not None:
        return config.prefill_buckets
    return mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()
