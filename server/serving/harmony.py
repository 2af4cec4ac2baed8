"""gpt-oss's harmony format on the output side: which models speak it, and `HarmonyParser`, which splits
their streamed output into reasoning, answer and tool calls.

After the prompt's ``<|start|>assistant`` a harmony model writes one or more messages, each a header,
``<|message|>``, a body and a terminator::

    <|channel|>analysis<|message|>Need the weather.<|end|>
    <|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>
    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>

The header names the channel (``analysis``, ``commentary``, ``final``) and, for a call, the recipient
(``to=functions.NAME``, before or after the channel); a content type (``json``, ``<|constrain|>json``)
may follow. ``<|end|>`` ends a message and another follows; ``<|return|>`` and ``<|call|>`` end the
generation (they are EOS tokens, so the engine never passes them on: the end of the text ends the last
message). The analysis channel is reasoning; a message to ``functions.NAME`` is a tool call whose body
is its JSON arguments; messages to other recipients (the built-in browser and python tools, which this
server does not run) are reasoning too; final and commentary messages without a recipient (preambles)
are the answer.

The markers are special tokens: the engine emits their text only for a harmony model (the request's
`SamplingParams.skip_special_tokens` is False), and the parser keeps every special token (markers and
reserved ones alike) out of the reasoning and the answer. A header is never shown; output that never
starts a harmony header (the model ignored the format) is shown as the answer once it is clearly not
one. A call whose arguments are not JSON is dropped, as is a call beyond `max_calls` or any call when
the request offered no tools.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from server.serving.model_output import OutputDelta
from server.serving.tools import ParsedCall, ToolFormat

START, CHANNEL, MESSAGE, END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"
RETURN, CALL, CONSTRAIN = "<|return|>", "<|call|>", "<|constrain|>"
MARKERS = (START, CHANNEL, MESSAGE, END, RETURN, CALL, CONSTRAIN)
_TERMINATORS = frozenset({END, RETURN, CALL, START})  # START: the model went on without an <|end|>
FUNCTIONS = "functions."

_SPECIAL = re.compile(r"<\|[^|<>\s]{1,64}\|>")
_PARTIAL = re.compile(r"<(?:\|[^|<>\s]{0,64}\|?)?$")  # a special token's text cut at the end of the buffer
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([A-Za-z_]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_RAW_AFTER = 128  # header text with no marker in this many characters: the model is not writing harmony


def _parse_arguments(text: str, tools: Any = None) -> dict[str, Any]:
    value = json.loads(text.strip())
    if not isinstance(value, dict):
        raise ValueError("harmony call arguments must be a JSON object")
    return value


# Tools reach the prompt through the template (native); calls are parsed by HarmonyParser, and a forced
# call has a harmony grammar (`tool_grammar.harmony_lark_text`), not the {"name","arguments"} JSON one.
HARMONY_FORMAT = ToolFormat(CHANNEL, CALL, _parse_arguments, native=True, json_calls=False)


def is_harmony(tokenizer: Any) -> bool:
    """Whether the model speaks harmony: its chat template writes channels and its vocabulary has the markers."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or CHANNEL not in template or MESSAGE not in template:
        return False
    getter = getattr(tokenizer, "get_added_vocab", None)
    try:
        added = getter() if getter is not None else {}
    except (AttributeError, TypeError, ValueError):
        return False
    return all(marker in added for marker in (START, CHANNEL, MESSAGE, END, CALL))


def special_texts(tokenizer: Any) -> frozenset[str]:
    """The texts of the tokenizer's special added tokens (harmony's reserved tokens among them)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {getattr(t, "content", str(t)) for t in decoder.values() if getattr(t, "special", False)}
    return frozenset(texts) | frozenset(MARKERS)


class HarmonyParser:
    """Splits one choice's streamed harmony output into reasoning, answer and tool calls (an OutputParser)."""

    def __init__(self, tools_offered: bool, max_calls: int | None = None, specials: Iterable[str] = MARKERS) -> None:
        self.tools_offered = tools_offered
        self.max_calls = max_calls  # 1 when the request set parallel_tool_calls: false
        self.specials = frozenset(specials) | frozenset(MARKERS)
        self.calls: list[ParsedCall] = []
        self.dropped_unfinished = False  # a call cut short (or unparsable) was dropped, never shown
        self._buffer = ""
        self._header = ""  # the current message's header so far
        self._in_body = False
        self._kind = "content"  # the current body's destination: "reasoning" | "content" | "call" | "drop"
        self._name = ""  # the called function, for a "call" body
        self._body = ""  # a call's arguments so far

    @property
    def in_reasoning(self) -> bool:
        if self._in_body:
            return self._kind == "reasoning"
        match = _CHANNEL_NAME.search(self._header)
        return match is not None and match.group(1) == "analysis" and _RECIPIENT.search(self._header) is None

    def feed(self, text: str) -> OutputDelta:
        self._buffer += text
        out = OutputDelta()
        while self._step(out):
            pass
        return out

    def finish(self, cut: bool = False) -> OutputDelta:
        out = OutputDelta()
        while self._step(out):
            pass
        rest, self._buffer = self._buffer, ""
        if not self._in_body:
            self._header += rest
            if self._header.strip() and not self._has_special(self._header):
                out.content += self._header  # never a harmony header: the model wrote plain text
            self._header = ""
            return out
        if not cut:
            self._write(out, rest)
        self._close(out, cut)
        return out

    def _has_special(self, text: str) -> bool:
        return any(m.group(0) in self.specials for m in _SPECIAL.finditer(text))

    def _next_special(self, text: str) -> re.Match[str] | None:
        for match in _SPECIAL.finditer(text):
            if match.group(0) in self.specials:
                return match
        return None

    def _step(self, out: OutputDelta) -> bool:
        """Consume what the buffer decides; True when there may be more to do."""
        if not self._in_body:
            return self._step_header(out)
        match = self._next_special(self._buffer)
        if match is None:
            partial = _PARTIAL.search(self._buffer)
            keep = len(self._buffer) - partial.start() if partial else 0
            self._write(out, self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep :]
            return False
        self._write(out, self._buffer[: match.start()])
        token = match.group(0)
        self._buffer = self._buffer[match.end() :]
        if token in _TERMINATORS:
            self._close(out, cut=False)
            self._header = START if token == START else ""
        return True  # other special tokens inside a body are dropped

    def _step_header(self, out: OutputDelta) -> bool:
        at = self._buffer.find(MESSAGE)
        if at < 0:
            self._header += self._buffer
            self._buffer = ""
            if len(self._header) > _RAW_AFTER and not self._has_special(self._header):
                self._buffer, self._header = self._header, ""
                self._open("content")  # not harmony: the text is the answer
                return True
            return False
        self._header += self._buffer[:at]
        self._buffer = self._buffer[at + len(MESSAGE) :]
        channel = _CHANNEL_NAME.search(self._header)
        recipient = _RECIPIENT.search(self._header)
        self._header = ""
        if recipient is not None and recipient.group(1).startswith(FUNCTIONS):
            self._name = recipient.group(1)[len(FUNCTIONS) :]
            self._open("call" if self.tools_offered else "drop")
        elif recipient is not None or (channel is not None and channel.group(1) == "analysis"):
            self._open("reasoning")
        else:
            self._open("content")
        return True

    def _open(self, kind: str) -> None:
        self._in_body, self._kind, self._body = True, kind, ""

    def _write(self, out: OutputDelta, text: str) -> None:
        if not text:
            return
        if self._kind == "reasoning":
            out.reasoning += text
        elif self._kind == "content":
            out.content += text
        elif self._kind == "call":
            self._body += text

    def _close(self, out: OutputDelta, cut: bool) -> None:
        """End the current message; a call's body becomes a ParsedCall when its arguments are JSON."""
        if self._in_body and self._kind == "call":
            call = self._call(self._name, self._body)
            if call is not None:
                out.calls.append(call)
            elif cut or self._body.strip():
                self.dropped_unfinished = True
        self._in_body, self._kind, self._body, self._name = False, "content", "", ""

    def _call(self, name: str, body: str) -> ParsedCall | None:
        if not name:
            return None
        try:
            arguments = _parse_arguments(body)
        except ValueError:
            return None
        if self.max_calls is not None and len(self.calls) >= self.max_calls:
            return None
        call = ParsedCall(name, json.dumps(arguments, ensure_ascii=False))
        self.calls.append(call)
        return call


__all__ = ["HARMONY_FORMAT", "HarmonyParser", "MARKERS", "is_harmony", "special_texts"]
