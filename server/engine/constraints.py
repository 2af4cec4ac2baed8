"""Grammar-constrained decoding: structured output (JSON object / JSON Schema) and grammars (Lark, regex).

Owns `GrammarSpec` (what a request asks for: hashable, validated on construction, mapped from OpenAI's
`response_format` by `GrammarSpec.from_response_format`), `ConstraintFactory` (one per model: builds the
llguidance tokenizer lazily on first use, validates and compiles grammars, caches compiled grammars) and
`SequenceConstraint` (one sequence's matcher: the next-token mask, advancing by sampled tokens, finished
when the grammar is complete). `fill_masks` computes a step's masks for all constrained rows as one packed
bitmask (in parallel across rows) and `apply_bitmask` applies it to a (B, V) logits matrix.

The llguidance mask allows EOS exactly when the grammar accepts; once the grammar cannot be extended
(`finished`), only EOS is allowed and the engine ends the sequence with finish_reason "stop".

A spec with `after` (a token id sequence: a thinking model's end-of-reasoning marker) leaves the sequence
free until it has generated that sequence; the grammar constrains what follows.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import mlx.core as mx
import numpy as np

GrammarKind = Literal["json_object", "json_schema", "lark", "regex"]
_KINDS = ("json_object", "json_schema", "lark", "regex")

# Whitespace between JSON tokens: one space, or one line break plus up to 32 spaces/tabs of indentation.
# llguidance's default (any run of whitespace) lets small models loop on blank lines or spaces forever.
# A schema's own top-level "x-guidance" options override this.
JSON_WHITESPACE = r"(?:\x20|\r?\n[\x20\x09]{0,32})"
_CACHE_SIZE = 32
# llguidance's messages quote the grammar: source lines ("  2 | call: %json {...}", a caret line) at compile
# time, the matcher's <state> and <grammar> at run time. Clients get the message without them.
_SOURCE_LINE = re.compile(r"^\s*(?:\d+ \|.*|\^+)\s*$")

log = logging.getLogger(__name__)


def client_message(message: str) -> str:
    """An llguidance error message without the grammar source and matcher state it quotes."""
    message = message.split("<state>", 1)[0].split("<grammar>", 1)[0]
    lines = [line for line in message.splitlines() if not _SOURCE_LINE.match(line)]
    return "\n".join(lines).strip() or "the grammar matcher failed"


@dataclass(frozen=True)
class GrammarSpec:
    """What one request's output must match.

    kind "json_object": any JSON object. "json_schema": a JSON document valid against `schema` (a JSON
    Schema object; with `strict` False, schema keywords llguidance does not implement are ignored instead of
    rejected). "lark": a llguidance Lark grammar in `text` (it may embed JSON schemas with `%json {...}`).
    "regex": the whole output matches the regular expression in `text`.
    The schema is kept as a private deep copy; equality and hashing use its JSON text.
    `after`: token ids the sequence generates freely before the grammar starts (empty: from the start).
    """

    kind: GrammarKind
    schema: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    text: str | None = None
    strict: bool = True
    after: tuple[int, ...] = ()
    schema_json: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.kind not in _KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be a boolean, got {self.strict!r}")
        after = tuple(self.after)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in after):
            raise ValueError(f"after must be a sequence of token ids, got {self.after!r}")
        put(self, "after", after)
        if self.kind == "json_schema":
            if not isinstance(self.schema, Mapping):
                raise ValueError("a json_schema grammar needs `schema`, a JSON Schema object")
            if self.text is not None:
                raise ValueError("a json_schema grammar takes `schema`, not `text`")
            try:
                text = json.dumps(self.schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"the JSON schema is not JSON-serializable: {exc}") from None
            put(self, "schema_json", text)
            put(self, "schema", json.loads(text))  # a private copy: later changes by the caller do not leak in
        elif self.kind == "json_object":
            if self.schema is not None or self.text is not None:
                raise ValueError("a json_object grammar takes neither `schema` nor `text`")
        else:
            if not isinstance(self.text, str) or not self.text.strip():
                raise ValueError(f"a {self.kind} grammar needs `text`, a non-empty string")
            if self.schema is not None:
                raise ValueError(f"a {self.kind} grammar takes `text`, not `schema`")

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], strict: bool = True) -> GrammarSpec:
        return cls("json_schema", schema=schema, strict=strict)

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> GrammarSpec | None:
        """OpenAI's `response_format` -> a spec (None for {"type": "text"} or no response_format).

        {"type": "json_object"} and {"type": "json_schema", "json_schema": {"name", "schema", "strict"}};
        a json_schema without "schema" accepts any JSON object, as OpenAI does. Raises ValueError."""
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise ValueError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind == "json_schema":
            body = response_format.get("json_schema")
            if not isinstance(body, Mapping):
                raise ValueError("response_format.json_schema must be an object with `name` and `schema`")
            name = body.get("name")
            if name is not None and not isinstance(name, str):
                raise ValueError("response_format.json_schema.name must be a string")
            strict = body.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise ValueError("response_format.json_schema.strict must be a boolean")
            schema = body.get("schema")
            if schema is None:
                return cls.json_object()
            if not isinstance(schema, Mapping):
                raise ValueError("response_format.json_schema.schema must be a JSON Schema object")
            return cls.json_schema(schema, strict=bool(strict))
        raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _grammar_json(spec: GrammarSpec) -> str:
    """The llguidance grammar definition (a JSON string) for a spec."""
    from llguidance import LLMatcher

    if spec.kind in ("json_object", "json_schema"):
        schema = spec.schema_json if spec.kind == "json_schema" else '{"type":"object"}'
        options: dict[str, Any] = {"whitespace_pattern": JSON_WHITESPACE}
        if not spec.strict:
            options["lenient"] = True
        return LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if spec.kind == "lark":
        return LLMatcher.grammar_from_lark(spec.text)
    return LLMatcher.grammar_from_regex(spec.text)


def _tokenizer_json(tokenizer: Any) -> str:
    """The `tokenizers` JSON of an mlx-lm TokenizerWrapper, a HF fast tokenizer or a tokenizers.Tokenizer."""
    from copy import copy

    seen = 0
    obj = tokenizer
    while obj is not None and seen < 4:
        backend = getattr(obj, "backend_tokenizer", None)
        if backend is None and hasattr(obj, "to_str") and hasattr(obj, "no_padding"):
            backend = obj
        if backend is not None:
            backend = copy(backend)
            backend.no_padding()
            backend.no_truncation()
            return backend.to_str()
        obj = getattr(obj, "_tokenizer", None)
        seen += 1
    raise ValueError(
        "structured output needs a fast (Hugging Face `tokenizers`) tokenizer; this model's "
        f"tokenizer is a {type(tokenizer).__name__}"
    )


class SequenceConstraint:
    """One sequence's grammar state (an llguidance LLMatcher), waiting for `after` before it constrains."""

    __slots__ = ("_after", "_matcher", "_tail", "vocab_size")

    def __init__(self, matcher: Any, vocab_size: int, after: tuple[int, ...] = ()) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._after = tuple(after)
        self._tail: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        """True once the grammar constrains (it waits for its `after` token sequence until then)."""
        return not self._after

    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def fill_mask(self, bitmask: np.ndarray, row: int = 0) -> None:
        """Write the next token's allowed set into bitmask[row] (int32 words, bit i of word w = token 32w+i)."""
        target = bitmask[row]
        if bitmask.dtype != np.int32 or not target.flags["C_CONTIGUOUS"] or target.size != self.mask_words:
            raise ValueError(f"mask row must be {self.mask_words} contiguous int32 words")
        if not self.active:
            target.fill(-1)
            return
        self._matcher.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)

    def allowed_token_ids(self) -> np.ndarray:
        """The token ids allowed next (for tests and debugging; sampling uses `fill_masks`)."""
        bitmask = np.zeros((1, self.mask_words), dtype=np.int32)
        self.fill_mask(bitmask)
        bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[: self.vocab_size]
        return np.flatnonzero(bits)

    def advance(self, token_id: int) -> None:
        """Consume a sampled token. A token the grammar does not allow puts the constraint in an error state
        (`finished` and `error` then say so); it never raises for that. While waiting, tokens only
        move the wait along: the token that completes `after` starts the grammar."""
        if not self.active:
            self._tail = (*self._tail, int(token_id))[-len(self._after) :]
            if self._tail == self._after:
                self._after = ()
            return
        self._matcher.consume_token(int(token_id))
        if self._matcher.is_error():
            log.error("constrained decoding failed at token %d: %s", int(token_id), self._matcher.get_error())

    @property
    def finished(self) -> bool:
        """True when no further token but EOS is allowed (grammar complete), or after an error."""
        return self.active and self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """True when the output so far is a complete match (EOS allowed); False while waiting."""
        return self.active and self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        if not self._matcher.is_error():
            return None
        return client_message(self._matcher.get_error() or "")


class ConstraintFactory:
    """Builds SequenceConstraints for one model: `validate(spec)` raises ValueError for a grammar that
    cannot be used (naming the unsupported feature), `create(spec)` returns a fresh constraint.

    The llguidance tokenizer (about a second to build) is made on first use and kept; compiled grammars
    are kept in a small LRU cache (errors too) and each sequence gets a cheap deep copy. Thread-safe:
    requests are validated on the HTTP side and constraints are created on the engine thread."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int] = (), cache_size: int = _CACHE_SIZE
    ) -> None:
        self._source = tokenizer
        self.vocab_size = int(vocab_size)
        self._eos = sorted({int(t) for t in eos_token_ids})
        self._cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()  # spec -> template LLMatcher or error str
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._tokenizer: Any = None
        self._tokenizer_error: str | None = None

    @property
    def tokenizer(self) -> Any:
        """The llguidance LLTokenizer (built on first access)."""
        if self._tokenizer is None:
            with self._tokenizer_lock:
                if self._tokenizer is None and self._tokenizer_error is None:
                    self._build_tokenizer()
        if self._tokenizer_error is not None:
            raise ValueError(self._tokenizer_error)
        return self._tokenizer

    def _build_tokenizer(self) -> None:
        from llguidance import LLTokenizer

        if isinstance(self._source, LLTokenizer):
            self._tokenizer = self._source
            return
        try:
            text = _tokenizer_json(self._source)
            eos = self._eos or getattr(self._source, "eos_token_id", None)
            self._tokenizer = LLTokenizer(text, n_vocab=self.vocab_size, eos_token=eos)
        except ValueError as exc:
            self._tokenizer_error = str(exc)
        except Exception as exc:  # llguidance cannot read this tokenizer
            self._tokenizer_error = f"structured output is not available for this model's tokenizer: {exc}"

    def _template(self, spec: GrammarSpec) -> Any:
        if not isinstance(spec, GrammarSpec):
            raise ValueError(f"expected a GrammarSpec, got {type(spec).__name__}")
        if spec.after:
            spec = replace(spec, after=())  # one compiled grammar, whenever it starts
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
        if hit is None:
            hit = self._compile(spec)  # outside the lock: a large schema can take a while
            with self._lock:
                self._cache[spec] = hit
                self._cache.move_to_end(spec)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if isinstance(hit, str):
            raise ValueError(hit)
        return hit

    def _compile(self, spec: GrammarSpec) -> Any:
        """A fresh LLMatcher for the spec, or the error message that explains why there is none."""
        from llguidance import LLMatcher

        tokenizer = self.tokenizer
        what = {
            "json_object": "JSON object",
            "json_schema": "JSON schema",
            "lark": "Lark grammar",
            "regex": "regular expression",
        }[spec.kind]
        try:
            grammar = _grammar_json(spec)
        except (ValueError, TypeError) as exc:
            return f"Invalid {what}: {client_message(str(exc))}"
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            message = client_message(matcher.get_error())
            if spec.kind == "json_schema" and message.startswith("Unimplemented keys"):
                message += (
                    " (these JSON Schema keywords are not supported for structured output; "
                    "with strict=false they are ignored)"
                )
            return f"Unsupported {what}: {message}"
        return matcher

    def validate(self, spec: GrammarSpec) -> None:
        """Raise ValueError with a message for the client if the spec cannot be enforced."""
        self._template(spec)

    def create(self, spec: GrammarSpec) -> SequenceConstraint:
        """A new constraint at the start of the grammar (raises ValueError like `validate`)."""
        return SequenceConstraint(self._template(spec).deep_copy(), self.vocab_size, spec.after)


_executor: Any = None
_executor_lock = threading.Lock()


def _parallel_executor() -> Any:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                from llguidance import LLExecutor

                _executor = LLExecutor()
    return _executor


def fill_masks(rows: Sequence[tuple[int, SequenceConstraint]], batch: int, vocab: int) -> np.ndarray:
    """A (batch, ceil(vocab/32)) int32 bitmask: the grammar's allowed tokens for each (row, constraint),
    every token for the other rows (and for constraints still waiting to start). Rows are computed in
    parallel when there are several."""
    words = (vocab + 31) // 32
    rows = [(row, c) for row, c in rows if c.active]
    bitmask = np.full((batch, words), -1, dtype=np.int32)
    for _, constraint in rows:
        if constraint.vocab_size != vocab:
            raise ValueError(f"constraint built for a vocabulary of {constraint.vocab_size}, logits have {vocab}")
    if len(rows) == 1:
        row, constraint = rows[0]
        constraint.fill_mask(bitmask, row)
    elif rows:
        _parallel_executor().unsafe_compute_mask_ptr(
            [(c._matcher, row) for row, c in rows], bitmask.ctypes.data, words * 4, batch
        )
    return bitmask


def _apply(x: mx.array, words: mx.array) -> mx.array:
    bit = mx.left_shift(mx.array(1, dtype=mx.uint32), mx.arange(32, dtype=mx.uint32))
    allowed = (words[:, :, None] & bit) != 0
    allowed = allowed.reshape(x.shape[0], -1)[:, : x.shape[1]]
    return mx.where(allowed, x, mx.array(float("-inf"), dtype=x.dtype))


_apply_compiled = mx.compile(_apply)


def apply_bitmask(x: mx.array, bitmask: np.ndarray) -> mx.array:
    """x (B, V) with the tokens whose bit is 0 in bitmask (B, ceil(V/32)) set to -inf. Returns a new array."""
    return _apply_compiled(x, mx.array(bitmask.view(np.uint32)))


__all__ = [
    "ConstraintFactory",
    "GrammarSpec",
    "JSON_WHITESPACE",
    "SequenceConstraint",
    "apply_bitmask",
    "client_message",
    "fill_masks",
]
