"""What both halves of the GGUF conversion share: the conversion error and GGUF metadata values as plain Python.

`server.models.gguf` (weights, config) and `server.models.gguf_tokenizer`
(tokenizer files) both read `tokenizer.ggml.*` / `general.*` metadata with
`meta_value` and refuse what they cannot convert with `GGUFConversionError`.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np


class GGUFConversionError(ValueError):
    """The GGUF file uses something this converter does not support (architecture, tensor type, ...)."""


def meta_value(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    """A metadata value from ``mx.load(..., return_metadata=True)`` as plain Python.

    Scalars arrive as 0-d arrays, numeric lists as 1-d arrays; float32 values are rounded to
    their shortest float32 spelling (``9.999999747e-06`` -> ``1e-05``).
    """
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        if value.dtype == mx.float32:
            floats = [float(str(np.float32(v))) for v in np.array(value).reshape(-1)]
            return floats[0] if value.ndim == 0 else floats
        return value.item() if value.ndim == 0 else value.tolist()
    return value
