"""Device arrays brought to the host as typed Python lists.

`mx.array.tolist()` is typed as returning any nesting of scalars; the engine knows the shape and
dtype of what it reads back (token ids, logprobs, PRNG keys, losses), so these name it once, here.
"""

from __future__ import annotations

from typing import cast

import mlx.core as mx


def ints(x: mx.array) -> list[int]:
    """A 1-D integer array as a list of ints."""
    return cast(list[int], x.tolist())


def floats(x: mx.array) -> list[float]:
    """A 1-D floating-point array as a list of floats."""
    return cast(list[float], x.tolist())


def int_rows(x: mx.array) -> list[list[int]]:
    """A 2-D integer array as a list of rows of ints."""
    return cast(list[list[int]], x.tolist())


def float_rows(x: mx.array) -> list[list[float]]:
    """A 2-D floating-point array as a list of rows of floats."""
    return cast(list[list[float]], x.tolist())


def float_item(x: mx.array) -> float:
    """A one-element floating-point array as a float."""
    return cast(float, x.item())
