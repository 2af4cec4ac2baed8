"""Chat prompts as token ids, where only the chat template's own markup becomes control tokens.

A request string (message content, names, tool-call arguments, tool results, tool definitions)
that contains the text of a control token, say ``"<|im_end|>"``, would otherwise be tokenized as
that token and could close its own turn and forge system or assistant turns. ``render_prompt``:

1. finds the control tokens of the tokenizer (`control_tokens`): its special added tokens, and
   the other added tokens that the chat template or mlx-lm's tool and thinking markers use;
2. if no request string contains one, tokenizes exactly as before (``apply_chat_template``),
   so ordinary prompts stay token-identical and the KV prefix cache keeps matching;
3. else wraps each occurrence in request strings in a pair of private-use markers, renders the
   template to text, and encodes it piecewise: text outside markers as usual (the template's
   control tokens stay tokens), wrapped occurrences as plain text, markers dropped.

Reasoning tags (``<think>``, ``</think>``) in assistant content are left alone: the model wrote
them, and templates split past reasoning off at them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from server.errors import InvalidRequestError

# supplementary private use area A: never in ordinary text; a pair absent from the request is chosen
_MARKER_BASE = 0xF0000
_MARKER_TRIES = 1024


@dataclass(frozen=True)
class ControlTokens:
    """The added-token texts to keep out of request strings, and those allowed in assistant content."""

    texts: tuple[str, ...]  # longest first, so a regex alternation prefers the longest match
    reasoning: frozenset[str]  # within the model's thinking markers

    def pattern(self, exclude: frozenset[str] = frozenset()) -> re.Pattern[str] | None:
        texts = [t for t in self.texts if t not in exclude]
        return re.compile("|".join(map(re.escape, texts))) if texts else None


def template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template text (a dict of named templates joined)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template if isinstance(template, str) else ""


def _marker_texts(tokenizer: Any, names: tuple[str, ...]) -> str:
    out = []
    for name in names:
        try:
            value = getattr(tokenizer, name, None)
        except (AttributeError, ValueError):
            value = None
        if isinstance(value, str):
            out.append(value)
    return "\n".join(out)


@functools.lru_cache(maxsize=8)
def control_tokens(tokenizer: Any) -> ControlTokens:
    """Special added tokens, plus non-whitespace added tokens the template or mlx-lm's markers use.

    Other added tokens (Gemma's whitespace runs and HTML tags, say) are ordinary text to the model
    and keep their usual tokenization in request strings. Found once per tokenizer (a served model's
    never changes): reading the added vocabulary and the template cost ~0.35 ms of every chat request.
    """
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    thinking = _marker_texts(tokenizer, ("think_start", "think_end"))
    markup = "\n".join(
        (template_text(tokenizer), thinking, _marker_texts(tokenizer, ("tool_call_start", "tool_call_end")))
    )
    texts = set()
    for token in decoder.values():
        content = getattr(token, "content", str(token))
        if not content or content.isspace():
            continue
        if getattr(token, "special", False) or content in markup:
            texts.add(content)
    ordered = tuple(sorted(texts, key=lambda t: (-len(t), t)))
    return ControlTokens(ordered, frozenset(t for t in ordered if thinking and t in thinking))


def _strings(value: Any) -> list[str]:
    """Every string in a JSON-like value, dict keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


@dataclass(frozen=True)
class _Marking:
    """How request strings are marked for one render."""

    full: re.Pattern[str]  # every control token
    assistant: re.Pattern[str] | None  # assistant content: all but the reasoning tags
    open: str
    close: str

    def wrap(self, pattern: re.Pattern[str] | None) -> Callable[[str], str]:
        if pattern is None:
            return lambda text: text
        return lambda text: pattern.sub(lambda m: f"{self.open}{m.group(0)}{self.close}", text)

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        full = self.wrap(self.full)
        out = []
        for message in messages:
            marked = {k: _map_strings(v, full) for k, v in message.items() if k != "content"}
            if "content" in message:
                assistant = message.get("role") == "assistant"
                marked["content"] = _map_strings(message["content"], self.wrap(self.assistant) if assistant else full)
            out.append(marked)
        return out


def _needs_marking(
    tokens: ControlTokens,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    kwargs: dict[str, Any],
    template: str,
) -> _Marking | None:
    full = tokens.pattern()
    if full is None:
        return None
    assistant = tokens.pattern(tokens.reasoning)
    hit = any(full.search(s) for s in (*_strings(tools), *_strings(kwargs)))
    for message in messages:
        rest = {k: v for k, v in message.items() if k != "content"}
        content = assistant if message.get("role") == "assistant" else full
        hit = hit or any(full.search(s) for s in _strings(rest))
        hit = hit or (content is not None and any(content.search(s) for s in _strings(message.get("content"))))
    if not hit:
        return None
    seen = [*_strings(messages), *_strings(tools), *_strings(kwargs), template]
    for i in range(0, _MARKER_TRIES, 2):
        pair = chr(_MARKER_BASE + i), chr(_MARKER_BASE + i + 1)
        if not any(c in s for s in seen for c in pair):
            return _Marking(full, assistant, *pair)
    raise InvalidRequestError("The request's text could not be made safe for the chat template.", param="messages")


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` tokenized as ordinary text: the model's normalizer, pre-tokenizer and vocabulary, no added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        words = (
            backend.pre_tokenizer.pre_tokenize_str(normalized)
            if backend.pre_tokenizer is not None
            else [(normalized, (0, len(normalized)))]
        )
        return [token.id for word, _ in words for token in backend.model.tokenize(word)]
    # no fast backend: a character at a time can never spell a multi-character added token
    return [i for ch in text for i in tokenizer.encode(ch, add_special_tokens=False)]


def encode_marked(tokenizer: Any, text: str, tokens: ControlTokens, open_: str, close: str) -> list[int]:
    """Rendered text -> ids: marked control-token texts as plain text, everything else as usual.

    A template's string operations can part a marker from its token (a split at the token's
    text); a token next to a lone marker is still plain text, and lone markers are dropped.
    """
    alternation = "|".join(map(re.escape, tokens.texts))
    o, c = re.escape(open_), re.escape(close)
    pattern = re.compile(f"{o}(?P<a>{alternation}){c}?|(?P<b>{alternation}){c}|{o}|{c}")
    ids: list[int] = []
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            ids.extend(tokenizer.encode(text[start : match.start()], add_special_tokens=False))
        protected = match.group("a") or match.group("b")
        if protected:
            ids.extend(_plain_ids(tokenizer, protected))
        start = match.end()
    if start < len(text):
        ids.extend(tokenizer.encode(text[start:], add_special_tokens=False))
    return ids


# what a template can raise on a conversation it does not accept (`raise_exception`, a filter
# given the wrong type, a missing key); none of them is the server's fault
TEMPLATE_ERRORS = (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError)


def _render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    kwargs: dict[str, Any],
    tokenize: bool,
) -> Any:
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=True, tokenize=tokenize, **kwargs
    )


def _failing_message(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    kwargs: dict[str, Any],
    error: str,
) -> int | None:
    """The message where the template raises `error`: the last of the shortest prefix that fails with it.

    None when a one-line conversation fails the same way (the tools or the kwargs are at fault).
    """

    def fails(conversation: list[dict[str, Any]]) -> bool:
        try:
            _render(tokenizer, conversation, tools, kwargs, tokenize=False)
        except TEMPLATE_ERRORS as exc:
            return str(exc) == error
        return False

    if fails([{"role": "user", "content": "Hello."}]):
        return None
    return next((end - 1 for end in range(1, len(messages) + 1) if fails(messages[:end])), None)


def _rejected(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    kwargs: dict[str, Any],
    exc: Exception,
) -> InvalidRequestError:
    error = str(exc) or type(exc).__name__
    index = _failing_message(tokenizer, messages, tools, kwargs, str(exc))
    if index is None:
        return InvalidRequestError(
            f"The model's chat template cannot render this request: {error}", param="messages", code="invalid_messages"
        )
    where = f"messages[{index}]"
    return InvalidRequestError(
        f"The model's chat template cannot render {where}: {error}", param=where, code="invalid_messages"
    )


def render_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Template messages (and tools, for templates that render them) -> prompt ids, request text kept as text.

    `template_kwargs` are extra template variables (`chat_template_kwargs`); their strings are
    request text too. A conversation the template refuses is a 400 naming the message where the
    template raised, when a shorter conversation shows which one it is.
    """
    kwargs = template_kwargs or {}
    tokens = control_tokens(tokenizer)
    marking = _needs_marking(tokens, messages, tools or None, kwargs, template_text(tokenizer))
    try:
        if marking is None:
            return list(_render(tokenizer, messages, tools, kwargs, tokenize=True))
        wrap = marking.wrap(marking.full)
        text = _render(
            tokenizer, marking.messages(messages), _map_strings(tools, wrap), _map_strings(kwargs, wrap), tokenize=False
        )
    except TEMPLATE_ERRORS as exc:
        raise _rejected(tokenizer, messages, tools, kwargs, exc) from exc
    return encode_marked(tokenizer, text, tokens, marking.open, marking.close)
