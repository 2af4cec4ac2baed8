"""Incremental detokenization with stop strings.

Owns the conversion of one sequence's generated token ids into text deltas. Two layers:

* decoding: each step decodes only a short window of tokens and emits the window's new characters,
  so the cost per token is bounded. A window starts on a character boundary and keeps at least one
  already-emitted token as context, so SentencePiece's "strip the first leading space", byte
  fallback and byte-level BPE come out the same as decoding everything at once. Text ending in
  U+FFFD (an incomplete UTF-8 character) is held back until the character completes, but not for
  ever: once _PENDING_LIMIT tokens went by without the text moving on, the bytes behind those U+FFFD
  can no longer form a character (UTF-8 has at most 4 bytes), and all but the last are passed on.
  Without that, a model repeating a lone lead byte (a greedy loop of a random or confused model) streamed
  nothing until its last token; the window then restarts near the end, so such a run costs linear time.
* stop strings: decoded text that ends with the beginning of a stop string is held back until it is
  decided; a completed stop string ends the sequence, and neither it nor anything after it is emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"
_WINDOW = 8  # a complete window of at least this many tokens restarts at its last token
_PENDING_LIMIT = 4  # tokens without new text after which trailing U+FFFD (all but the last) are final


class IdsToText:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, through the Rust `tokenizers` backend directly
    where the Python wrappers (mlx-lm's, then transformers') would return the same text.

    The wrappers cost several times the decode itself, and the engine decodes once per token per
    sequence: at batch 128 that was most of a decode step's host time. The shortcut is taken only for a
    fast tokenizer that cleans up no spaces, and only if it decodes a probe of ids from across the
    vocabulary exactly as the wrapper does; anything else keeps the wrapper.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._backend = self._find_backend(tokenizer)

    @staticmethod
    def _find_backend(tokenizer: Any) -> Any:
        inner = getattr(tokenizer, "_tokenizer", None)  # mlx-lm's TokenizerWrapper holds the HF tokenizer
        hf = inner if hasattr(inner, "backend_tokenizer") else tokenizer
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "decode") or getattr(hf, "clean_up_tokenization_spaces", True):
            return None
        if not getattr(getattr(type(hf), "_decode", None), "__module__", "").startswith(
            "transformers.tokenization_utils"
        ):
            return None  # a model-specific tokenizer class with its own decoding
        try:
            size = int(backend.get_vocab_size(with_added_tokens=True))
            probe = list(range(0, size, max(1, size // 512)))
            windows = [probe, probe[:3], probe[-5:], list(range(min(size, 300)))]
            same = all(
                backend.decode(w, skip_special_tokens=True) == tokenizer.decode(w, skip_special_tokens=True)
                for w in windows
            )
        except Exception:  # any surprise: keep the wrapper
            return None
        return backend if same else None

    @property
    def direct(self) -> bool:
        """Whether decoding bypasses the wrappers."""
        return self._backend is not None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas: never emits a partial UTF-8 character, and never
    emits text that is (or may become) a stop string."""

    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens  # False: special tokens decode to their text
        self._stop = stop
        # Deltas are defined against decode(generated ids) alone, so the prompt is not decode context;
        # it is kept for callers that want it.
        self.prompt_token_ids = tuple(prompt_token_ids)
        self._tokens: list[int] = []
        self._window_start = 0  # index in _tokens where the decode window begins
        self._window_emitted = 0  # characters of decode(window) already passed on
        self._complete_at = 0  # token count at the last step whose decoded text ended on a character boundary
        self._progress_at = 0  # token count at the last step that emitted text or ended on a boundary
        self._held = ""  # decoded text kept back because it may be the start of a stop string
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        self._stopped = False
        self._flushed = False

    @property
    def stopped(self) -> bool:
        """A stop string was completed: the engine finishes the sequence with finish_reason "stop"."""
        return self._stopped

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache]
        return self._text_cache

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids added so far (a copy)."""
        return list(self._tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that is now safe to emit ("" if held back)."""
        if self._stopped or self._flushed:
            return ""
        self._tokens.append(token_id)
        return self._release(self._decode_step(final=False), final=False)

    def flush(self) -> str:
        """At the end (length/eos): release held-back text that did not turn into a stop string."""
        if self._stopped or self._flushed:
            return ""
        delta = self._release(self._decode_step(final=True), final=True)
        self._flushed = True
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_step(self, final: bool) -> str:
        """New stable characters of the output (all remaining ones when final)."""
        window = self._tokens[self._window_start :]
        if not window:
            return ""
        text = self._decode(window)
        end = len(text)
        released = False
        if not final:
            while end > self._window_emitted and text[end - 1] == _REPLACEMENT:
                end -= 1
            if end == self._window_emitted < len(text) - 1 and len(self._tokens) - self._progress_at >= _PENDING_LIMIT:
                # U+FFFD for _PENDING_LIMIT tokens: no later byte completes them, except perhaps the last
                end, released = len(text) - 1, True
        new = text[self._window_emitted : end] if end > self._window_emitted else ""
        self._window_emitted = max(self._window_emitted, end)
        if new or end == len(text):
            self._progress_at = len(self._tokens)
        if released and len(window) >= _WINDOW:
            self._restart_in_run()
        if end == len(text):
            if len(window) >= _WINDOW:
                # restart at the previous boundary: the tokens since then decode to whole characters on
                # their own, and stay as context (SentencePiece's leading space, byte-fallback runs)
                self._window_start = self._complete_at
                self._window_emitted = len(self._decode(self._tokens[self._window_start :]))
            self._complete_at = len(self._tokens)
        return new

    def _restart_in_run(self) -> None:
        """After a run of U+FFFD was passed on but its last: restart the window at the last tokens that carry
        text (the bytes of a character that may still complete are among them), so a long run is not decoded
        again at every token. Tokens that decode to nothing (special tokens) do not count."""
        start, carrying = len(self._tokens), 0
        while start > self._window_start and carrying < _PENDING_LIMIT - 1:
            start -= 1
            carrying += bool(self._decode([self._tokens[start]]))
        text = self._decode(self._tokens[start:])
        if text.endswith(_REPLACEMENT):
            self._window_start = self._complete_at = start
            self._window_emitted = len(text) - 1

    def _release(self, new: str, final: bool) -> str:
        """Run new text through the stop-string filter; return what may be emitted now."""
        if not self._stop:
            return self._emit(new)
        buf = self._held + new
        if not buf:
            return ""
        # buf is short: the held part (shorter than the longest stop string) plus one step's text
        hit = -1
        for s in self._stop:
            i = buf.find(s)
            if i != -1 and (hit == -1 or i < hit):
                hit = i
        if hit != -1:
            self._stopped = True
            self._held = ""
            return self._emit(buf[:hit])
        keep = 0 if final else self._partial_stop_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return self._emit(buf[: len(buf) - keep])

    def _partial_stop_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best, last = 0, buf[-1]
        for s in self._stop:
            n = s.rfind(last, 0, min(len(s) - 1, len(buf)))  # candidate prefixes end with buf's last char
            while n + 1 > best:
                if buf.endswith(s[: n + 1]):
                    best = n + 1
                    break
                n = s.rfind(last, 0, n)
        return best

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
            self._text_cache = None
        return delta
