"""One choice's model output split into what the client sees: reasoning, answer text and tool calls.

Every generation endpoint that shapes chat-style output (chat completions, the
Responses API) builds one `OutputParser` per choice with `output_parser` and
feeds it the detokenized text as it streams. A parser holds back markup (a
think marker or a tool-call start split across tokens) until it knows what it
is; `finish` flushes what is left when the generation ends.

The default parser composes the think-block splitter (server/serving/reasoning.py)
with the tool-call parser (server/serving/tools.py): reasoning text never
reaches the tool-call parser, so a call written inside the reasoning stays
reasoning. Models with their own channel protocol (gpt-oss's harmony) have
their own `OutputParser`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from server.registry import ServedModel
from server.serving.reasoning import ReasoningMode, ReasoningSplitter
from server.serving.tools import ParsedCall, ToolCallParser, ToolFormat


@dataclass
class OutputDelta:
    reasoning: str = ""  # text for reasoning_content / reasoning items
    content: str = ""  # the answer's text
    calls: list[ParsedCall] = field(default_factory=list)  # ParsedCall from server/serving/tools.py


class OutputParser(Protocol):
    """Splits one choice's streamed model text into reasoning, answer and tool calls."""

    def feed(self, text: str) -> OutputDelta: ...

    def finish(self, cut: bool = False) -> OutputDelta: ...  # cut: the generation hit its length

    @property
    def in_reasoning(self) -> bool: ...  # the next token counts as a reasoning token (usage)


class ThinkThenAnswer:
    """The default parser: an optional think block (reasoning), then the answer with its tool calls."""

    def __init__(self, reasoning: ReasoningSplitter | None, tools: ToolCallParser | None) -> None:
        self._reasoning = reasoning
        self._tools = tools

    @property
    def in_reasoning(self) -> bool:
        return self._reasoning is not None and self._reasoning.in_reasoning

    def feed(self, text: str) -> OutputDelta:
        reasoning, answer = self._reasoning.feed(text) if self._reasoning is not None else ("", text)
        return self._answer(reasoning, answer, finish=None)

    def finish(self, cut: bool = False) -> OutputDelta:
        reasoning, answer = self._reasoning.finish(cut) if self._reasoning is not None else ("", "")
        return self._answer(reasoning, answer, finish=cut)

    def _answer(self, reasoning: str, answer: str, finish: bool | None) -> OutputDelta:
        if self._tools is None:
            return OutputDelta(reasoning, answer)
        content, calls = self._tools.feed(answer) if answer else ("", [])
        if finish is not None:
            rest, more = self._tools.finish(cut=finish)
            content, calls = content + rest, calls + more
        return OutputDelta(reasoning, content, calls)


class ChoiceOutput:
    """One choice's output as it streams: its parser, its reasoning token count and its number of calls.

    A token counts as a reasoning token when the parser was in the reasoning before or after it (the
    markers included). Marker tokens the detokenizer drops (special tokens) get their text back first.
    """

    def __init__(self, parser: OutputParser, reasoning: ReasoningMode | None) -> None:
        self.parser = parser
        self.reasoning = reasoning
        self.reasoning_tokens = 0
        self.num_calls = 0

    def add(self, token_id: int | None, text: str, finish_reason: str | None) -> OutputDelta:
        """Feed one engine event's text (and finish the parser on the last event)."""
        was = self.parser.in_reasoning
        if self.reasoning is not None:
            text = self.reasoning.text_of(token_id, text)
        delta = self.parser.feed(text)
        if token_id is not None and (was or self.parser.in_reasoning):
            self.reasoning_tokens += 1
        if finish_reason is not None:
            end = self.parser.finish(cut=finish_reason == "length")
            delta = OutputDelta(delta.reasoning + end.reasoning, delta.content + end.content, delta.calls + end.calls)
        self.num_calls += len(delta.calls)
        return delta


def output_parser(
    served: ServedModel,
    tools: list[dict[str, Any]] | None,
    tool_format: ToolFormat | None,
    max_calls: int | None,
    reasoning: ReasoningMode | None = None,
) -> OutputParser:
    """The parser for one choice of `served`'s output.

    `tools`/`tool_format`: set when tool calls are parsed from the answer (None: the answer is all content);
    `max_calls`: 1 when the request set parallel_tool_calls false; `reasoning`: the model's think markers
    and whether the prompt left the output inside the think block (None: the model does not reason).
    """
    from server.serving.harmony import HarmonyParser, is_harmony, special_texts  # harmony.py imports OutputDelta

    tokenizer = getattr(served, "tokenizer", None)
    if is_harmony(tokenizer):  # gpt-oss: channels, not think markers or tool-call markers
        return HarmonyParser(tools is not None and tool_format is not None, max_calls, special_texts(tokenizer))
    splitter = ReasoningSplitter(reasoning) if reasoning is not None else None
    calls = ToolCallParser(tool_format, tools, max_calls) if tools is not None and tool_format is not None else None
    return ThinkThenAnswer(splitter, calls)
