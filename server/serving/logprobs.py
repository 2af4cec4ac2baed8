"""Token text and bytes for logprobs, as OpenAI reports them (`token`, `bytes`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable stand-in char -> the byte it encodes."""
    visible = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = visible[:]
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, codes)}


class TokenText:
    """Maps token ids to (text, bytes) with a per-tokenizer cache."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_level = self._looks_byte_level()

    def _looks_byte_level(self) -> bool:
        sample = self.tokenizer.convert_ids_to_tokens(self.tokenizer.encode(" the end", add_special_tokens=False))
        return any(t.startswith("Ġ") for t in sample)

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._compute(token_id)
            self._cache[token_id] = found
        return found

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_decoder()
        if self._byte_level and raw and all(ch in decoder for ch in raw):
            data = bytes(decoder[ch] for ch in raw)
        elif raw and raw.startswith("<0x") and raw.endswith(">") and len(raw) == 6:
            data = bytes([int(raw[3:5], 16)])
        else:
            data = self.tokenizer.decode([token_id]).encode()
        return data.decode("utf-8", errors="replace"), list(data)
