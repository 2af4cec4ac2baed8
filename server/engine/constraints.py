"""Grammar-constrained decoding: structured output (JSON object / JSON Schema) and grammars (Lark, regex).

Owns `GrammarSpec` (what a request asks for: hashable, validated on construction, mapped from OpenAI's
`response_format` by `GrammarSpec.from_response_format`), `ConstraintFactory` (one per model: builds the
llguidance tokenizer lazily on first use, validates and compiles grammars, caches compiled grammars and
creates each sequence's `SequenceConstraint`; that state, `fill_masks` and `apply_bitmask` live in
`constraint_state.py` and are re-exported here).

The llguidance mask allows EOS exactly when the grammar accepts; once the grammar cannot be extended
(`finished`), only EOS is allowed and the engine ends the sequence with finish_reason "stop".

A spec with `after` (a token id sequence: a thinking model's end-of-reasoning marker) leaves the sequence
free until it has generated that sequence; the grammar constrains what follows. With `opens` (the start
marker's ids) as well, the think block is optional: only an output that begins with `opens` waits for
`after`; one that begins otherwise is constrained from its first token. A `budget` bounds the wait: past it,
the end marker is forced.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from server.engine.constraint_state import SequenceConstraint, apply_bitmask, client_message, fill_masks

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # defined only in llguidance's stubs

GrammarKind = Literal["json_object", "json_schema", "lark", "regex"]
_KINDS = ("json_object", "json_schema", "lark", "regex")

# Whitespace between JSON tokens: one space, or one line break plus up to 32 spaces/tabs of indentation.
# llguidance's default (any run of whitespace) lets small models loop on blank lines or spaces forever.
# A schema's own top-level "x-guidance" options override this.
JSON_WHITESPACE = r"(?:\x20|\r?\n[\x20\x09]{0,32})"
_CACHE_SIZE = 32


@dataclass(frozen=True)
class GrammarSpec:
    """What one request's output must match.

    kind "json_object": any JSON object. "json_schema": a JSON document valid against `schema` (a JSON
    Schema object; with `strict` False, schema keywords llguidance does not implement are ignored instead of
    rejected). "lark": a llguidance Lark grammar in `text` (it may embed JSON schemas with `%json {...}`).
    "regex": the whole output matches the regular expression in `text`.
    The schema is kept as a private deep copy; equality and hashing use its JSON text.
    `after`: token ids the sequence generates freely before the grammar starts (empty: from the start).
    `opens`: token ids that must begin the output for that wait to happen (empty: it always happens); any
    other beginning is the grammar's from the first token (a think block the model may or may not open).
    `budget`: the most tokens the wait may take before `after` is forced (None: no limit).
    """

    kind: GrammarKind
    schema: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    text: str | None = None
    strict: bool = True
    after: tuple[int, ...] = ()
    opens: tuple[int, ...] = ()
    budget: int | None = None
    schema_json: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.kind not in _KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be a boolean, got {self.strict!r}")
        for name in ("after", "opens"):
            ids = tuple(getattr(self, name))
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ValueError(f"{name} must be a sequence of token ids, got {getattr(self, name)!r}")
            put(self, name, ids)
        if self.opens and not self.after:
            raise ValueError("opens (a think block's start marker) needs after (its end marker)")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 0 or not self.after):
            raise ValueError(f"budget must be a token count >= 0 for a spec with after, got {self.budget!r}")
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
        options: JsonCompileOptions = {"whitespace_pattern": JSON_WHITESPACE}
        if not spec.strict:
            options["lenient"] = True
        assert schema is not None, "GrammarSpec sets schema_json for a json_schema grammar"
        return LLMatcher.grammar_from_json_schema(schema, defaults=options)
    assert spec.text is not None, "GrammarSpec requires text for a lark or regex grammar"
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
        if spec.after or spec.opens or spec.budget is not None:
            spec = replace(spec, after=(), opens=(), budget=None)  # one compiled grammar, whenever it starts
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
        return SequenceConstraint(
            self._template(spec).deep_copy(), self.vocab_size, spec.after, spec.opens, spec.budget
        )


__all__ = [
    "ConstraintFactory",
    "GrammarSpec",
    "JSON_WHITESPACE",
    "SequenceConstraint",
    "apply_bitmask",
    "client_message",
    "fill_masks",
]
