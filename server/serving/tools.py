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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"


def _hermes_parse(text: str, tools: Any = None) -> dict[str, Any]:
    value = json.loads(text.strip())
    if not isinstance(value, dict) or "name" not in value:
        raise ValueError("a tool call needs a name")
    return value


@dataclass(frozen=True)
class ToolFormat:
    start: str
    end: str
    parse: Callable[[str, Any], dict[str, Any]]
    native: bool  # the chat template renders `tools` itself
    json_calls: bool = False  # a call is {"name", "arguments"} JSON between the markers (a forced call's grammar)


def _is_json_parser(parse: Any) -> bool:
    """mlx-lm's `json_tools` parser (Qwen2.5, Qwen3, QwQ, Hermes-style templates): calls are JSON objects."""
    return getattr(parse, "__module__", "") == "mlx_lm.tool_parsers.json_tools"


def tool_format(tokenizer: Any) -> ToolFormat:
    template = getattr(tokenizer, "chat_template", None) or ""
    if getattr(tokenizer, "has_tool_calling", False) and "tools" in template:
        parse = tokenizer.tool_parser
        return ToolFormat(
            tokenizer.tool_call_start, tokenizer.tool_call_end, parse, native=True, json_calls=_is_json_parser(parse)
        )
    return ToolFormat(HERMES_START, HERMES_END, _hermes_parse, native=False, json_calls=True)


def tools_system_prompt(tools: list[dict[str, Any]], forced: str | None) -> str:
    """The tool instructions for templates that do not render tools themselves."""
    listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    rule = (
        f"You must call the function {forced!r} now."
        if forced
        else "Call a function only when it helps answer; otherwise answer normally."
    )
    return (
        "You can call these functions:\n" + listing + "\n\nTo call a function, reply with exactly\n"
        f'{HERMES_START}{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}{HERMES_END}\n' + rule
    )


def with_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]], forced: str | None) -> list[dict[str, Any]]:
    """Prepend (or extend) the system message with tool instructions (non-native templates)."""
    text = tools_system_prompt(tools, forced)
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{text}"
        messages = [first, *messages[1:]]
    else:
        messages = [{"role": "system", "content": text}, *messages]
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
        self._in_call = False
        self.calls: list[ParsedCall] = []
        self.dropped_unfinished = False  # finish() dropped a call cut short (its markup is never content)

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        """Consume text; return the content that is safe to show and any calls completed."""
        self._buffer += text
        content = ""
        calls: list[ParsedCall] = []
        while True:
            if not self._in_call:
                at = self._buffer.find(self.fmt.start)
                if at < 0:
                    keep = _partial_suffix(self._buffer, self.fmt.start)
                    content += self._buffer[: len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return content, calls
                content += self._buffer[:at]
                self._buffer = self._buffer[at + len(self.fmt.start) :]
                self._in_call = True
            end = self._buffer.find(self.fmt.end)
            if end < 0:
                return content, calls
            call = self._parse(self._buffer[:end])
            self._buffer = self._buffer[end + len(self.fmt.end) :]
            self._in_call = False
            if call is None:
                continue
            calls.append(call)

    def finish(self, cut: bool = False) -> tuple[str, list[ParsedCall]]:
        """End of generation: an unterminated call is parsed if it can be, else dropped (never shown as
        content). A held-back partial start marker is text, unless the generation was `cut` short
        (finish_reason "length"): then it is the start of a call that never came, and dropped too."""
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            self._in_call = False
            call = self._parse(rest)
            if call is not None:
                return "", [call]
            self.dropped_unfinished = True
            return "", []
        if cut and rest:
            self.dropped_unfinished = True
            return "", []
        return rest, []

    def _parse(self, text: str) -> ParsedCall | None:
        try:
            value = self.fmt.parse(text, self.tools)
        except (ValueError, KeyError, TypeError, SyntaxError):
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        if self.max_calls is not None and len(self.calls) >= self.max_calls:
            return None  # calls beyond the allowed number are dropped, not shown as text
        arguments = value.get("arguments", {})
        encoded = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call = ParsedCall(value["name"], encoded)
        self.calls.append(call)
        return call


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
