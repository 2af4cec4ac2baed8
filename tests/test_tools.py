"""Tool-call text -> tool_calls, streamed or whole; tool instructions for templates without tools."""

from __future__ import annotations

import json

from server.serving.tool_grammar import call_schema, lark_text, marker
from server.serving.tools import HERMES_END, HERMES_START, ToolCallParser, tool_format, with_tools

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
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
    history = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = with_tools(history, TOOLS, None)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert HERMES_START in out[2]["content"] and out[3]["role"] == "user" and "sunny" in out[3]["content"]


def test_parallel_tool_calls_false_keeps_only_the_first_call() -> None:
    p = ToolCallParser(tool_format(_NoTools()), TOOLS, max_calls=1)
    text, calls = p.feed(CALL + CALL)
    assert len(calls) == 1 and text == ""
    unlimited = parser()
    assert len(unlimited.feed(CALL + CALL)[1]) == 2


# -- markup never reaches the client ----------------------------------------------------------------


def test_an_unterminated_call_that_does_not_parse_is_dropped_not_shown() -> None:
    """A forced call cut by max_tokens: the text before it stays, its markup never becomes content."""
    p = parser()
    shown, calls = p.feed('Sure. <tool_call>{"name": "get')
    rest, more = p.finish(cut=True)
    assert shown + rest == "Sure. " and not calls and not more and p.dropped_unfinished
    p = parser()
    p.feed('<tool_call>{"name": "get')
    assert p.finish() == ("", [])  # ended some other way (EOS mid-call): dropped as well


def test_a_partial_start_marker_is_dropped_only_when_the_generation_was_cut() -> None:
    p = parser()
    assert p.feed("Answer: <tool_c") == ("Answer: ", [])
    assert p.finish(cut=True) == ("", [])
    p = parser()
    p.feed("a < b and <tool")
    assert p.finish(cut=False)[0] == "<tool"


class _Native:
    """A tokenizer whose template renders tools, with one of mlx-lm's real tool parsers."""

    has_tool_calling = True
    chat_template = "{% for tool in tools %}{% endfor %}"

    def __init__(self, module: str) -> None:
        import importlib

        parser_module = importlib.import_module(f"mlx_lm.tool_parsers.{module}")
        self.tool_call_start, self.tool_call_end = parser_module.tool_call_start, parser_module.tool_call_end
        self.tool_parser = parser_module.parse_tool_call


def test_only_json_call_formats_get_the_forcing_grammar() -> None:
    """Qwen3-Coder's calls start with `<tool_call>` too, but hold XML: a JSON grammar would break them."""
    assert tool_format(_NoTools()).json_calls
    assert tool_format(_Native("json_tools")).json_calls and tool_format(_Native("json_tools")).native
    coder = tool_format(_Native("qwen3_coder"))
    assert coder.start == HERMES_START and coder.native and not coder.json_calls


# -- the forcing grammar ----------------------------------------------------------------------------


class _Added:
    def __init__(self, added: dict[str, int]) -> None:
        self.added = added

    def get_added_vocab(self) -> dict[str, int]:
        return self.added


def test_markers_that_are_added_tokens_become_token_references() -> None:
    assert marker("<tool_call>", _Added({"<tool_call>": 151657})) == "<[151657]>"
    assert marker("<tool_call>", _Added({})) == '"<tool_call>"'
    assert marker("<tool_call>", object()) == '"<tool_call>"'


def test_the_call_schema_hoists_defs_and_the_grammar_is_compact_and_bounded() -> None:
    parameters = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": {"Digit": {"type": "integer"}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/Digit"}},
    }
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    schema = call_schema(tool)
    assert schema["$defs"] == parameters["$defs"] and "$defs" not in schema["properties"]["arguments"]
    assert schema["properties"]["arguments"]["additionalProperties"] is False
    strict = {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}, "strict": True}}
    text = lark_text(tool_format(_NoTools()), [(0, tool), (1, strict)], _Added({"<tool_call>": 7}))
    assert text.startswith('start: <[7]> NL? call NL? "</tool_call>"\nNL: "\\n"\ncall: tool_0 | tool_1\n')
    assert '"x-guidance": {"whitespace_flexible": false, "lenient": true}' in text  # non-strict: lenient
    assert '"x-guidance": {"whitespace_flexible": false, "lenient": false}' in text
