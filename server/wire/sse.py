"""Server-sent events as bytes: `data:` events, named events (the Responses API), and a stream's chunk envelope
encoded once.

A streamed chat completion or completion repeats the same envelope (id, created, model, fingerprint)
around every chunk's choices. `ChunkFrame` encodes it once, with empty choices, and splits it around
them, so a chunk costs the encoding of its choices only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from server.wire.codec import encode

DONE = b"data: [DONE]\n\n"
_CHOICES = b'"choices":[]'


def data_event(payload: bytes) -> bytes:
    """One `data:` event (the payload is JSON: it has no line breaks)."""
    return b"data: " + payload + b"\n\n"


def named_event(name: str, payload: bytes) -> bytes:
    """One event with an `event:` line (the Responses API names each event by its type)."""
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


class ChunkFrame:
    """The envelope of a stream's chunks, encoded once: `event(choices)` is one whole `data:` event."""

    def __init__(self, empty: msgspec.Struct) -> None:
        raw = encode(empty)  # a JSON string cannot hold the unescaped quotes of the marker: it is the field itself
        at = raw.index(_CHOICES) + len(_CHOICES) - 1
        self._prefix = b"data: " + raw[:at]
        self._suffix = raw[at:] + b"\n\n"

    def event(self, choices: Sequence[Any]) -> bytes:
        return self._prefix + b",".join(encode(choice) for choice in choices) + self._suffix
