"""Training files: parsing and validating OpenAI-style JSONL, turning chat examples into
token ids with a loss mask, and resolving "auto" hyperparameters from the dataset size.

Line formats (one JSON object a line; blank lines are skipped):

    chat        {"messages": [{"role": "system"|"user"|"assistant", "content": str,
                               "weight": 0|1 (assistant only, default 1), "name": str (optional)}, ...]}
                {"prompt": str, "completion": str}
    embedding   {"anchor": str, "positive": str, "negative": str (optional)}

An embedding line without "negative" still trains: the other examples' positives in the
batch are its negatives (in-batch negatives), so only files of pairs need batches > 1.

Errors are `ExampleError(line, message)` with the 1-based line; `line == 0` marks a
problem of the whole file (empty, too few examples). `describe` renders "Line 3: invalid JSON".
At most MAX_ERRORS are collected; validation stops reading there. Whatever a line does
(JSON nested deeper than the decoder's recursion limit, a chat template that raises on it),
it becomes that line's error: validation never raises for a file's content.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from server.finetune.chat_tokens import TokenizedExample, tokenize_chat
from server.finetune.spec import ExampleError, Hyperparameters, TrainingKind, ValidationReport

MAX_ERRORS = 20
MIN_EXAMPLES: dict[TrainingKind, int] = {"chat": 10, "embedding": 2}
ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = frozenset({"role", "content", "weight", "name"})

# Auto epochs, after OpenAI's cookbook: 3 epochs, raised for small sets so that at least
# MIN_TARGET_EXAMPLES examples are seen in all (capped at MAX_AUTO_EPOCHS), lowered for big sets.
# OpenAI's floor is 100; 48 keeps CPU jobs short, and at the trainers' learning rates 16 chat
# examples teach SmolLM2-135M a fact within 2 of their 3 epochs.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 48
MAX_TARGET_EXAMPLES = 25_000
MAX_AUTO_EPOCHS = 25
EPOCH_RANGE = (1, 50)
BATCH_RANGE = (1, 256)
EMBEDDING_AUTO_BATCH = 32  # contrastive losses want many in-batch negatives

T = TypeVar("T")


@dataclass(frozen=True)
class ChatExample:
    """One chat line: `messages` (validated dicts, template-ready) or a prompt/completion pair."""

    messages: tuple[dict[str, Any], ...] = ()
    prompt: str | None = None
    completion: str | None = None


@dataclass(frozen=True)
class EmbeddingExample:
    anchor: str
    positive: str
    negative: str | None = None

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.anchor, self.positive) if self.negative is None else (self.anchor, self.positive, self.negative)


def describe(error: ExampleError) -> str:
    """'Line 3: invalid JSON', or the bare message for a whole-file problem."""
    return f"Line {error.line}: {error.message}" if error.line else error.message


# --- reading lines ------------------------------------------------------------------


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON) for every non-blank line; ValueError names a bad line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _LineError(line, "not valid UTF-8 (training files must be UTF-8 encoded JSONL)") from exc
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except ValueError as exc:
            yield number, _LineError(number, f"invalid JSON ({getattr(exc, 'msg', exc)})")
        except RecursionError:
            yield number, _LineError(number, "invalid JSON (nested too deeply)")


class _LineError(ValueError):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.error = ExampleError(line, message)


def _scan(
    path: Path, parse: Callable[[Any], T], check: Callable[[T], int], min_examples: int
) -> tuple[list[T], ValidationReport]:
    """Parse and check every line (check returns the example's token count or raises ValueError)."""
    examples: list[T] = []
    errors: list[ExampleError] = []
    tokens = lines = 0
    try:
        for number, obj in _json_lines(path):
            if len(errors) >= MAX_ERRORS:
                break
            lines += 1
            try:
                if isinstance(obj, _LineError):
                    raise obj
                example = parse(obj)
                tokens += check(example)
                examples.append(example)
            except _LineError as exc:
                errors.append(exc.error)
            except ValueError as exc:
                errors.append(ExampleError(number, str(exc)))
            except Exception as exc:  # noqa: BLE001 - e.g. a template raising on this line: the line's error
                errors.append(ExampleError(number, f"the example cannot be used ({type(exc).__name__}: {exc})"))
        else:
            if lines == 0:
                errors.append(
                    ExampleError(
                        0,
                        f"the file holds no examples (it is empty or has only blank lines); "
                        f"at least {min_examples} are required",
                    )
                )
            elif lines < min_examples:
                errors.append(ExampleError(0, f"the file has {lines} examples; at least {min_examples} are required"))
    except _LineError as exc:  # not UTF-8: one error, the rest is unreadable
        errors.append(exc.error)
    except OSError as exc:
        errors.append(ExampleError(0, f"cannot read the training file: {exc.strerror or exc}"))
    return examples, ValidationReport(len(examples), tokens, tuple(errors[:MAX_ERRORS]))


def _load(path: Path, parse: Callable[[Any], T], check: Callable[[T], int]) -> list[T]:
    examples, report = _scan(path, parse, check, 1)
    if not report.ok:
        raise ValueError(f"{path}: {describe(report.errors[0])}")
    return examples


# --- chat ---------------------------------------------------------------------------


def _string(value: Any, what: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
    }.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    """A scalar as JSON (a string cut at 40 characters), anything else by its type: never re-encodes a tree."""
    if isinstance(value, str):
        return json.dumps(value[:40] + ("..." if len(value) > 40 else ""))
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return _type_name(value)


def _object(obj: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(obj)}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValueError(f"unexpected key '{unknown[0]}' (expected {', '.join(sorted(allowed))})")
    return obj


def _message(i: int, m: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ValueError(f"{where} must be an object, got {_type_name(m)}")
    if "tool_calls" in m or "function_call" in m:
        raise ValueError(f"{where}: tool calls are not supported in training files")
    unknown = sorted(set(m) - _MESSAGE_KEYS)
    if unknown:
        raise ValueError(f"{where} has an unexpected key '{unknown[0]}'")
    role = m.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {_shown(role)}")
    if "content" not in m:
        raise ValueError(f"{where} has no 'content'")
    out: dict[str, Any] = {"role": role, "content": _string(m["content"], f"{where}.content")}
    if "name" in m:
        out["name"] = _string(m["name"], f"{where}.name")
    if "weight" in m:
        if role != "assistant":
            raise ValueError(f"{where}: 'weight' is only allowed on assistant messages")
        if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
            raise ValueError(f"{where}.weight must be 0 or 1, got {_shown(m['weight'])}")
        out["weight"] = int(m["weight"])
    return out


def parse_chat_line(obj: Any) -> ChatExample:
    """Validate one decoded chat line; ValueError says what is wrong."""
    if isinstance(obj, dict) and "messages" not in obj and ("prompt" in obj or "completion" in obj):
        d = _object(obj, frozenset({"prompt", "completion"}))
        if "completion" not in d or "prompt" not in d:
            raise ValueError("a prompt/completion example needs both 'prompt' and 'completion'")
        return ChatExample(
            prompt=_string(d["prompt"], "'prompt'"),
            completion=_string(d["completion"], "'completion'", allow_empty=False),
        )
    d = _object(obj, frozenset({"messages"}))
    if "messages" not in d:
        raise ValueError("missing 'messages' (or 'prompt' and 'completion')")
    if not isinstance(d["messages"], list):
        raise ValueError(f"'messages' must be a list, got {_type_name(d['messages'])}")
    if not d["messages"]:
        raise ValueError("'messages' is empty")
    messages = tuple(_message(i, m) for i, m in enumerate(d["messages"]))
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is not None and first["role"] == "assistant":
        raise ValueError("an assistant message comes before any user message")
    if not any(m["role"] == "assistant" and m["content"].strip() and m.get("weight", 1) for m in messages):
        raise ValueError("no assistant message to train on (need one with content and weight 1)")
    return ChatExample(messages=messages)


def _chat_check(tokenizer: Any, max_length: int) -> Callable[[ChatExample], int]:
    def check(example: ChatExample) -> int:
        tokens = tokenize_example(example, tokenizer)
        if len(tokens.ids) > max_length:
            raise ValueError(f"example is {len(tokens.ids)} tokens, over the model's context of {max_length}")
        if not any(tokens.loss_mask[1:]):
            raise ValueError("no trainable tokens after applying the chat template")
        return len(tokens.ids)

    return check


def tokenize_example(example: ChatExample, tokenizer: Any) -> TokenizedExample:
    """Token ids and loss mask of one chat line (see server/finetune/chat_tokens.py)."""
    if example.completion is not None:
        prompt = list(tokenizer.encode(example.prompt or ""))
        completion = list(tokenizer.encode(example.completion, add_special_tokens=False)) + [tokenizer.eos_token_id]
        return TokenizedExample(tuple(prompt + completion), (False,) * len(prompt) + (True,) * len(completion))
    return tokenize_chat(list(example.messages), tokenizer)


def validate_chat_file(path: Path, tokenizer: Any, max_length: int) -> ValidationReport:
    """Check a chat/completion JSONL file against the model's template and context length."""
    return _scan(path, parse_chat_line, _chat_check(tokenizer, max_length), MIN_EXAMPLES["chat"])[1]


def load_chat_examples(path: Path, tokenizer: Any, max_length: int) -> list[TokenizedExample]:
    """Tokenized examples of an (already validated) file; ValueError on the first bad line."""
    return [tokenize_example(e, tokenizer) for e in _load(path, parse_chat_line, _chat_check(tokenizer, max_length))]


# --- embedding ----------------------------------------------------------------------


def parse_embedding_line(obj: Any) -> EmbeddingExample:
    d = _object(obj, frozenset({"anchor", "positive", "negative"}))
    for key in ("anchor", "positive"):
        if key not in d:
            raise ValueError(f"missing '{key}'")
    negative = d.get("negative")
    return EmbeddingExample(
        _string(d["anchor"], "'anchor'", False),
        _string(d["positive"], "'positive'", False),
        None if negative is None else _string(negative, "'negative'", False),
    )


def _embedding_check(encoder: Any) -> Callable[[EmbeddingExample], int]:
    def check(example: EmbeddingExample) -> int:
        lengths = [len(ids) for ids in encoder.tokenize(list(example.texts))]
        for name, n in zip(("anchor", "positive", "negative"), lengths):
            if n > encoder.max_length:
                raise ValueError(f"'{name}' is {n} tokens, over the model's limit of {encoder.max_length}")
        return sum(lengths)

    return check


def validate_embedding_file(path: Path, encoder: Any) -> ValidationReport:
    """Check an anchor/positive(/negative) JSONL file against the encoder's input limit."""
    return _scan(path, parse_embedding_line, _embedding_check(encoder), MIN_EXAMPLES["embedding"])[1]


def load_embedding_examples(path: Path, encoder: Any) -> list[EmbeddingExample]:
    return _load(path, parse_embedding_line, _embedding_check(encoder))


# --- hyperparameters ----------------------------------------------------------------


def auto_epochs(n_examples: int) -> int:
    """3; more for small sets, to see >= 48 examples in all (10 -> 4, 5 -> 9, at most 25);
    fewer for huge ones, to see <= 25,000 (20,000 -> 1)."""
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def auto_batch_size(kind: TrainingKind, n_examples: int) -> int:
    """Chat: ~0.2% of the examples (1 below 750, as OpenAI); embedding: up to 32, the whole set if smaller."""
    if kind == "embedding":
        return min(EMBEDDING_AUTO_BATCH, n_examples)
    return max(BATCH_RANGE[0], min(BATCH_RANGE[1], round(n_examples * 0.002)))


def _integer(name: str, value: Any, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name} must be 'auto' or an integer from {bounds[0]} to {bounds[1]}, got {value!r}")
    return value


def resolve_hyperparameters(
    kind: TrainingKind,
    n_examples: int,
    n_epochs: int | str | None = None,
    batch_size: int | str | None = None,
    learning_rate_multiplier: float | str | None = None,
) -> Hyperparameters:
    """Replace "auto"/None with the auto rules; ValueError names a value out of range."""
    if n_examples < 1:
        raise ValueError("cannot train on an empty dataset")
    epochs = auto_epochs(n_examples) if n_epochs in (None, "auto") else _integer("n_epochs", n_epochs, EPOCH_RANGE)
    if batch_size in (None, "auto"):
        batch = auto_batch_size(kind, n_examples)
    else:
        batch = _integer("batch_size", batch_size, BATCH_RANGE)
        if batch > n_examples:
            raise ValueError(f"batch_size {batch} is larger than the {n_examples} training examples")
    multiplier = 1.0
    if learning_rate_multiplier not in (None, "auto"):
        m = learning_rate_multiplier
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 100:
            raise ValueError(f"learning_rate_multiplier must be 'auto' or a number above 0 (at most 100), got {m!r}")
        multiplier = float(m)
    return Hyperparameters(n_epochs=epochs, batch_size=batch, learning_rate_multiplier=multiplier)
