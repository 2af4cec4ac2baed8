"""The four shapes of a batchable text field (completions' `prompt`, embeddings' `input`), told apart in one place.

OpenAI accepts a string, a list of strings, a list of token ids, or a list of
token-id lists (strings and id lists may mix). `batch_items` turns any of them
into one list of items, each a text or a token-id list; the endpoints add their
own limits and error messages.
"""

from __future__ import annotations

from typing import Any


def is_token_ids(value: Any) -> bool:
    """A list of ints (bools excluded, though Python counts them as ints); the empty list included."""
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def batch_items(raw: Any, *, empty_ids_allowed: bool) -> list[str | list[int]] | None:
    """The items of a prompt/input in any accepted shape, or None when it has none of them.

    A lone token-id list is one item and must be non-empty; inside a list, an empty token-id
    list is an item only when `empty_ids_allowed`.
    """
    if isinstance(raw, str):
        return [raw]
    if is_token_ids(raw) and raw:
        return [raw]
    if (
        isinstance(raw, list)
        and raw
        and all(isinstance(x, str) or (is_token_ids(x) and (empty_ids_allowed or x)) for x in raw)
    ):
        return raw
    return None
