"""Prefill bucket shapes (server/engine/prefill_buckets.py) and the padded step layouts they run as."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from server.config import Settings, parse_settings
from server.engine.attention_mask import attention_mask
from server.engine.config import EngineConfig
from server.engine.paged_cache import StepLayout, slot_ids
from server.engine.prefill_buckets import (
    MIN_TOKENS,
    PREFIX_ROOM,
    PrefillShape,
    bucket,
    buckets_on,
    fresh_shapes,
    padded_shape,
    template_prefix,
    warm_shapes,
)


def test_buckets_are_powers_of_two_and_one_and_a_half_times_them() -> None:
    assert [bucket(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    assert bucket(1000) == 1024 and bucket(1025) == 1536 and bucket(1537) == 2048
    assert bucket(5, floor=16) == 16 and bucket(17, floor=16) == 24
    for n in range(1, 5000):  # never below n, never more than 1.5x above it (past the smallest buckets)
        assert n <= bucket(n) <= max(2, 1.5 * n)


def test_a_forward_pads_rows_tokens_and_width_to_buckets() -> None:
    # a fresh burst: keys for the tokens and PREFIX_ROOM more (64 + 64 = 128; 16 + 64 = 80 -> 96)
    assert padded_shape(4, 57, 57) == PrefillShape(4, 64, 128)
    assert padded_shape(5, 3, 3) == PrefillShape(6, MIN_TOKENS, 96)
    # the same burst after a cached prefix within PREFIX_ROOM (a template header, shared beginnings, an
    # earlier chunk): the same shape; past it, wider keys
    assert padded_shape(4, 57, 57 + PREFIX_ROOM) == padded_shape(4, 57, 57)
    assert padded_shape(4, 57, 57 + PREFIX_ROOM + 8).width == 192
    # a resumed turn: 3 new tokens after 500 of context read 13 padded positions more, then round up
    assert padded_shape(1, 3, 503) == PrefillShape(1, 16, 768)
    shape = padded_shape(7, 100, 900)
    assert shape.width >= 900 + shape.tokens - 100 and shape.width == bucket(shape.width)


def test_fresh_shapes_cover_every_burst_the_scheduler_can_make() -> None:
    shapes = fresh_shapes(max_rows=64, budget=512)
    assert len(shapes) == len(set(shapes)) and all(s.width == bucket(s.tokens + PREFIX_ROOM) for s in shapes)
    # any split of a 512-token budget into at most 64 rows, fresh or after up to PREFIX_ROOM cached tokens,
    # lands on a warmed shape
    warmed = set(shapes)
    for rows in range(1, 65):
        for longest in range(1, 513):
            if rows * longest <= 512 * 1.5:
                for cached in (0, 16, 32, 48, PREFIX_ROOM):
                    assert padded_shape(rows, longest, cached + longest) in warmed, (rows, longest, cached)
    assert max(s.rows for s in shapes) == 64 and max(s.tokens for s in shapes) == 512


def test_a_padded_width_reads_scratch_columns_the_mask_hides() -> None:
    bs, scratch = 4, 9
    layout = StepLayout([2], 3, [[5, 1]], bs, counts=[2], scratch_block=scratch, width=12)
    reads = np.array(layout.read_slots)
    assert reads.shape == (1, 12)
    assert reads[0, :4].tolist() == slot_ids([5, 1], 0, 4, bs).tolist()  # its own 2 + 2 new tokens
    assert all(scratch * bs <= s < (scratch + 1) * bs for s in reads[0, 4:])  # padding token, padded columns
    mask = np.array(layout.mask(None))  # one row over padded keys: an array mask, not "causal"
    assert mask.shape == (1, 1, 3, 12)
    assert mask[0, 0].tolist() == [[j <= p for j in range(12)] for p in (2, 3, 4)]
    assert attention_mask([2], 3, None, width=5) == "causal"  # unpadded: mlx-lm's own mask, as before
    with pytest.raises(ValueError, match="below"):
        StepLayout([2], 3, [[5, 1]], bs, counts=[3], scratch_block=scratch, width=4)
    with pytest.raises(ValueError, match="scratch"):
        StepLayout([0], 3, [[5]], bs, width=8)


def test_buckets_default_to_cuda_and_follow_the_flag() -> None:
    on_cuda = mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()
    assert buckets_on(EngineConfig()) is on_cuda
    assert buckets_on(EngineConfig(prefill_buckets=True)) and not buckets_on(EngineConfig(prefill_buckets=False))
    assert Settings().engine_config().prefill_buckets is None
    for flag, value in (("on", True), ("off", False), ("auto", None)):
        assert parse_settings(["--prefill-buckets", flag], {}).engine_config().prefill_buckets is value
    assert parse_settings([], {"MLX_DROPIN_PREFILL_BUCKETS": "on"}).engine_config().prefill_buckets is True
    with pytest.raises(ValueError, match="prefill_buckets"):
        Settings(prefill_buckets="always")


class Template:
    """A tokenizer whose chat template puts a fixed header before each message (one token per character)."""

    def __init__(self, header: str, fails: bool = False) -> None:
        self.header, self.fails = header, fails

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        if self.fails:
            raise ValueError("no chat template")
        return [ord(c) for c in self.header + messages[0]["content"] + ">"]


def test_warm_shapes_add_the_bursts_after_the_templates_cached_header() -> None:
    assert template_prefix(Template("<sys>you are helpful</sys><user>")) == 32
    assert template_prefix(Template("")) == 0 and template_prefix(Template("x", fails=True)) == 0
    fresh = fresh_shapes(8, 256)
    assert warm_shapes(8, 256, 15, 16) == fresh  # less than a block: nothing is found cached
    assert warm_shapes(8, 256, 40, 16) == fresh  # two full blocks: within PREFIX_ROOM, the fresh shapes
    shapes = warm_shapes(8, 256, 130, 16)  # a long system header: 128 tokens found cached, keys wider
    assert shapes[: len(fresh)] == fresh and len(shapes) == len(set(shapes)) and len(shapes) > len(fresh)
    for s in fresh:
        assert padded_shape(s.rows, s.tokens, 128 + s.tokens) in set(shapes)
