"""Tool calling: how tools reach the prompt, and how the model's tool-call text becomes `tool_calls`.

Models whose chat template knows tools (mlx-lm detects their call format:
`<tool_call>...</tool_call>` JSON, Qwen3-Coder XML, Mistral, ...) get `tools`
through their own template and mlx-lm's parser for their format. Models
without one (the default SmolLM2) get the tools described in a system message
and answer in the Hermes format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

`ToolCallParser` works on text as it streams: content outside a call passes
through (a partial start marker is held back), a complete call becomes one
`ParsedCall`. Markup never reaches the client as content: a call the
generation cut short (max_tokens) is dropped at `finish()` unless what it has
already parses, and the text before its start marker stays.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.serving.tool_formats import FORMATS, call_example, detect_format

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"


def _hermes_parse(text: str, tools: Any = None) -> dict[str, Any]:
    value = json.loads(text.strip())
    if not isinstance(value, dict) or "name" not in value:
        raise ValueError("a tool call needs a name")
    return value


@dataclass(frozen=True)
class ToolFormat:
    start: str  # "": a call is the whole message (see `leads`)
    end: str  # "": a call runs to the next start marker or the end of the generation
    parse: Callable[[str, Any], Any]  # one call {"name", "arguments"} or a list of them
    native: bool  # the chat template renders `tools` itself
    json_calls: bool = False  # a call is {"name", "arguments"} JSON between the markers (a forced call's grammar)
    name: str = ""  # the format's name in `tool_formats.FORMATS` ("" for one only mlx-lm knows)
    leads: tuple[str, ...] = ()  # start == "": what a whole-message call begins with
    opened: bool = False  # the generation prompt ends with `start`: the output begins inside it
    text_recipient: str = ""  # after `start`: plain text up to the next `start` (Functionary v3.2's "all\n")
    hidden: tuple[str, ...] = ()  # structural markers dropped from content (Kimi K3's response tags)

    @property
    def forceable(self) -> bool:
        """Whether `tool_grammar` can force a call in this format."""
        return self.json_calls or self.name in FORMATS


def _is_json_parser(parse: Any) -> bool:
    """mlx-lm's `json_tools` parser (Qwen2.5, Qwen3, QwQ, Hermes-style templates): calls are JSON objects."""
    return getattr(parse, "__module__", "") == "mlx_lm.tool_parsers.json_tools"


def named_format(name: str, native: bool) -> ToolFormat:
    """The `ToolFormat` of a format in `tool_formats.FORMATS` (`native`: the template renders `tools`)."""
    spec = FORMATS[name]
    return ToolFormat(
        spec.start,
        spec.end,
        spec.parse,
        native=native,
        json_calls=name == "hermes",
        name=name,
        leads=spec.leads,
        opened=spec.opened,
        text_recipient=spec.text_recipient,
        hidden=spec.hidden,
    )


def _inferred_name(parse: Any) -> str | None:
    """Our name for the format of a parser mlx-lm inferred from the vocabulary (LFM2.5's `pythonic`), if we know it."""
    module = getattr(parse, "__module__", "") or ""
    name = module.rpartition(".")[2] if module.startswith("mlx_lm.tool_parsers.") else ""
    return name if name in FORMATS and name != "hermes" else None


# `tools | map(...) | tojson` (llama.cpp's own R1 template): jinja2's map gives a generator, which the tojson of
# transformers' template environment cannot serialize, so such a template gets its tools in a system message
_UNRENDERABLE_TOOLS = re.compile(r"tools\s*\|\s*map\([^)]*\)\s*\|\s*tojson")


def tool_format(tokenizer: Any) -> ToolFormat:
    """The format this model's template writes tool calls in (`tool_formats.detect_format`), else the one
    mlx-lm inferred (ours when we know it: forceable), else Hermes described in a system message. A template
    that writes calls in a known format but does not render `tools` (DeepSeek-V3.1, the R1 distills) gets
    the tools in a system message in that format."""
    template = getattr(tokenizer, "chat_template", None) or ""
    renders_tools = "tools" in template and not _UNRENDERABLE_TOOLS.search(template)
    name = detect_format(template) if isinstance(template, str) else None
    if name is not None and (renders_tools or name != "hermes"):
        return named_format(name, renders_tools)
    if getattr(tokenizer, "has_tool_calling", False) and renders_tools:
        parse = tokenizer.tool_parser
        inferred = _inferred_name(parse)
        if inferred is not None:
            return named_format(inferred, True)
        return ToolFormat(
            tokenizer.tool_call_start, tokenizer.tool_call_end, parse, native=True, json_calls=_is_json_parser(parse)
        )
    return ToolFormat(HERMES_START, HERMES_END, _hermes_parse, native=False, json_calls=True, name="hermes")


def tools_system_prompt(tools: list[dict[str, Any]], forced: str | None, fmt: ToolFormat | None = None) -> str:
    """The tool instructions for templates that do not render tools themselves (in the template's own call
    format when it has one, DeepSeek-V3.1's; else Hermes)."""
    listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    rule = (
        f"You must call the function {forced!r} now."
        if forced
        else "Call a function only when it helps answer; otherwise answer normally."
    )
    return (
        "You can call these functions:\n" + listing + "\n\nTo call a function, reply with exactly\n"
        f"{call_example(fmt.name if fmt is not None else 'hermes')}\n" + rule
    )


def with_tools(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], forced: str | None, fmt: ToolFormat | None = None
) -> list[dict[str, Any]]:
    """Prepend (or extend) the system message with tool instructions (non-native templates). A template
    that writes calls in its own format renders past calls and results itself; the others get them as text."""
    text = tools_system_prompt(tools, forced, fmt)
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{text}"
        messages = [first, *messages[1:]]
    else:
        messages = [{"role": "system", "content": text}, *messages]
    if fmt is not None and fmt.name not in ("", "hermes"):
        return messages
    # tool results and past calls as plain text, which every template can render
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = "".join(
                f"{HERMES_START}{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}"
                f"{HERMES_END}"
                for c in message["tool_calls"]
            )
            out.append({"role": "assistant", "content": (message.get("content") or "") + calls})
        elif message["role"] == "tool":
            out.append(
                {
                    "role": "user",
                    "content": f"Result of tool call {message.get('tool_call_id', '')}: {message['content']}",
                }
            )
        else:
            out.append(message)
    return out


def tool_call_entry(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A past tool call as chat templates expect it (arguments parsed from their JSON string when they parse)."""
    try:
        parsed: Any = json.loads(arguments) if arguments else {}
    except ValueError:
        parsed = arguments
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": parsed}}


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON string, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


class ToolCallParser:
    """Splits streamed model text into content and tool calls."""

    def __init__(
        self, fmt: ToolFormat, tools: list[dict[str, Any]] | None = None, max_calls: int | None = None
    ) -> None:
        self.fmt = fmt
        self.tools = tools
        self.max_calls = max_calls  # 1 when the request set parallel_tool_calls: false
        self._buffer = ""
        self._in_call = fmt.opened
        self._recipient = fmt.opened and bool(fmt.text_recipient)  # just after a start: text or a call?
        self._plain = False  # a whole-message format whose message turned out not to be a call
        self.calls: list[ParsedCall] = []
        self.dropped_unfinished = False  # finish() dropped a call cut short (its markup is never content)

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        """Consume text; return the content that is safe to show and any calls completed."""
        self._buffer += text
        if not self.fmt.start:
            return self._feed_whole(), []
        content = ""
        calls: list[ParsedCall] = []
        while True:
            if not self._in_call:
                at, marker = _first_marker(self._buffer, (self.fmt.start, *self.fmt.hidden))
                if at < 0:
                    keep = max(_partial_suffix(self._buffer, m) for m in (self.fmt.start, *self.fmt.hidden))
                    content += self._buffer[: len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return content, calls
                content += self._buffer[:at]
                if marker != self.fmt.start:  # a structural marker: dropped, the text goes on
                    self._buffer = self._buffer[at + len(marker) :]
                    continue
                self._buffer = self._buffer[at + len(self.fmt.start) :]
                self._in_call = True
                self._recipient = bool(self.fmt.text_recipient)
            if self._recipient:
                lead = self.fmt.text_recipient
                if lead.startswith(self._buffer):
                    return content, calls  # not yet known (or exactly the text lead: its text comes next)
                self._recipient = False
                if self._buffer.startswith(lead):  # plain text up to the next start marker
                    self._buffer = self._buffer[len(lead) :]
                    self._in_call = False
                    continue
            end = self._buffer.find(self.fmt.end or self.fmt.start)
            if end < 0 or (not self.fmt.end and end == 0):
                return content, calls
            calls += self._parse(self._buffer[:end])
            if self.fmt.end:
                self._buffer = self._buffer[end + len(self.fmt.end) :]
                self._in_call = False
            else:  # no end marker: the next start marker ends this call and begins the next
                self._buffer = self._buffer[end + len(self.fmt.start) :]

    def _feed_whole(self) -> str:
        """A format whose call is the whole message: hold text until it shows whether it starts a call."""
        if self._plain:
            content, self._buffer = self._buffer, ""
            return content
        if self._in_call:
            return ""
        head = self._buffer.lstrip()
        if any(head.startswith(lead) for lead in self.fmt.leads):
            self._in_call = True
            return ""
        if not head or any(lead.startswith(head) for lead in self.fmt.leads):
            return ""
        self._plain = True
        content, self._buffer = self._buffer, ""
        return content

    def finish(self, cut: bool = False) -> tuple[str, list[ParsedCall]]:
        """End of generation: an unterminated call is parsed if it can be, else dropped (never shown as
        content). A held-back partial start marker is text, unless the generation was `cut` short
        (finish_reason "length"): then it is the start of a call that never came, and dropped too."""
        rest, self._buffer = self._buffer, ""
        if self._recipient and self.fmt.text_recipient.startswith(rest):
            self._in_call = self._recipient = False
            return "", []  # the output ended at a start marker or inside the text lead: nothing to show
        if self._in_call:
            self._in_call = False
            calls = self._parse(rest)
            if calls:
                return "", calls
            self.dropped_unfinished = True
            return "", []
        if cut and rest and not (not self.fmt.start and not rest.strip()):
            self.dropped_unfinished = True
            return "", []
        return rest, []

    def _parse(self, text: str) -> list[ParsedCall]:
        try:
            value = self.fmt.parse(text, self.tools)
        except (ValueError, KeyError, TypeError, SyntaxError, AttributeError, IndexError):
            return []
        parsed = []
        for one in value if isinstance(value, list) else [value]:
            if not isinstance(one, dict) or not isinstance(one.get("name"), str):
                continue
            if self.max_calls is not None and len(self.calls) >= self.max_calls:
                break  # calls beyond the allowed number are dropped, not shown as text
            arguments = one.get("arguments", {})
            encoded = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            call = ParsedCall(one["name"], encoded)
            if self.fmt.name == "mistral":  # Mistral's templates accept only 9-character alphanumeric call ids
                call.id = uuid.uuid4().hex[:9]
            self.calls.append(call)
            parsed.append(call)
        return parsed


def _first_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str]:
    """The earliest of `markers` in text: (position, marker), or (-1, "")."""
    found = [(at, m) for m in markers if (at := text.find(m)) >= 0]
    return min(found) if found else (-1, "")


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
