"""Tool-call text -> tool_calls, streamed or whole; tool instructions for templates without tools."""

from __future__ import annotations

import json

from server.serving.tools import HERMES_END, HERMES_START, ToolCallParser, tool_format, with_tools

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = f'{HERMES_START}{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}{HERMES_END}'


class _NoTools:
    chat_template = "{{ messages }}"
    has_tool_calling = False


def parser() -> ToolCallParser:
    return ToolCallParser(tool_format(_NoTools()), TOOLS)


def test_whole_text_with_a_call() -> None:
    p = parser()
    content, calls = p.feed("Let me check. " + CALL)
    rest, more = p.finish()
    assert content + rest == "Let me check. "
    (call,) = calls + more
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")


def test_streamed_character_by_character_never_leaks_markers() -> None:
    p = parser()
    shown, calls = "", []
    for ch in "Sure. " + CALL + " Done.":
        text, got = p.feed(ch)
        shown += text
        calls += got
        assert "<tool" not in shown
    rest, more = p.finish()
    assert shown + rest == "Sure.  Done." and len(calls + more) == 1


def test_two_calls_and_bad_json() -> None:
    p = parser()
    bad = f"{HERMES_START}{{not json}}{HERMES_END}"
    _, calls = p.feed(CALL + bad + CALL)
    assert len(calls) == 2


def test_unterminated_call_is_parsed_at_the_end() -> None:
    p = parser()
    p.feed(CALL[: -len(HERMES_END)])
    rest, calls = p.finish()
    assert rest == "" and calls and calls[0].name == "get_weather"


def test_text_without_calls_passes_through() -> None:
    p = parser()
    text, calls = p.feed("a < b and <tool")
    rest, more = p.finish()
    assert text + rest == "a < b and <tool" and not calls and not more


def test_instructions_and_history_for_templates_without_tools() -> None:
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = with_tools(history, TOOLS, None)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert HERMES_START in out[2]["content"] and out[3]["role"] == "user" and "sunny" in out[3]["content"]


def test_parallel_tool_calls_false_keeps_only_the_first_call() -> None:
    p = ToolCallParser(tool_format(_NoTools()), TOOLS, max_calls=1)
    text, calls = p.feed(CALL + CALL)
    assert len(calls) == 1 and text == ""
    unlimited = parser()
    assert len(unlimited.feed(CALL + CALL)[1]) == 2
