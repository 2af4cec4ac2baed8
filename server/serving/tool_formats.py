"""The native tool-call formats: which one a chat template speaks, its markers, and how its call text parses.

`detect_format(template)` names the format from markers the template writes (the facts mlx-lm's
`_infer_tool_parser` and the models' own docs record), plus formats mlx-lm has no parser for: Llama 3.x
JSON (`{"name": ..., "parameters": ...}`, bare or after `<|python_tag|>`), DeepSeek-V3.1
(`<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{args}<｜tool▁call▁end｜>`), the DeepSeek-R1 distills
(`<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` newline, the arguments in a ```json fence), DeepSeek-V3.2 DSML,
Functionary v3.1 (`<function=NAME>{args}</function>`) and v3.2 (`>>>NAME\n{args}`, `>>>all\n` before text).
MiniCPM5 (`<function name="N"><param name="K">V</param></function>`), Muse Spark (`<atem:function_calls>`)
and LongCat (`<longcat_tool_call>`) and Kimi K3's XTML (`<|open|>tools<|sep|><|open|>call tool="N"<|sep|>...`) are parsed by mlx-lm's parsers; Poolside Laguna writes GLM-4.7's format. `FORMATS` holds each format's markers and parse
function; a parse function gets the text between the start and end markers and returns one call
`{"name", "arguments"}` or a list of them, raising ValueError (or KeyError, TypeError, SyntaxError) when
the text is not a call. An empty `end` means the call runs to the next start marker or the end of the
generation (Mistral); an empty `start` means a call is the whole message (Llama 3.x). `opened`: the
generation prompt ends with the start marker, so the output begins inside it (Functionary v3.2's `>>>`);
`text_recipient`: what follows a start marker when the message is plain text up to the next start marker
(Functionary v3.2's `all\n`), not a call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Call = dict[str, Any]
Parse = Callable[[str, Any], "Call | list[Call]"]


@dataclass(frozen=True)
class FormatSpec:
    name: str
    start: str
    end: str
    parse: Parse
    leads: tuple[str, ...] = ()  # for start == "": what a whole-message call begins with
    opened: bool = False  # the generation prompt ends with `start`
    text_recipient: str = ""  # after `start`: plain text follows, not a call
    hidden: tuple[str, ...] = ()  # structural markers around the answer, never content (Kimi K3's response tags)


def _json_value(text: str) -> Any:
    return json.loads(text.strip())


def _named(name: Any, arguments: Any) -> Call:
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call needs a name")
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ValueError("a tool call's arguments are an object")
    return {"name": name, "arguments": arguments}


def parse_hermes(text: str, tools: Any = None) -> Call:
    """`{"name": ..., "arguments": {...}}` (Hermes, Qwen2.5/Qwen3/QwQ, SmolLM3 fallback)."""
    value = _json_value(text)
    if not isinstance(value, dict):
        raise ValueError("a tool call is a JSON object")
    return _named(value.get("name"), value.get("arguments", {}))


def _json_objects(text: str) -> list[Any]:
    """Consecutive JSON values separated by whitespace, `;` or `,`."""
    decoder, at = json.JSONDecoder(), 0
    values: list[Any] = []
    while True:
        while at < len(text) and text[at] in " \t\r\n;,":
            at += 1
        if at >= len(text):
            return values
        value, at = decoder.raw_decode(text, at)
        values.append(value)


def parse_llama3(text: str, tools: Any = None) -> list[Call]:
    """Llama 3.1/3.2/3.3: `{"name": ..., "parameters": {...}}` (one or more), maybe after `<|python_tag|>`."""
    text = text.strip().removeprefix("<|python_tag|>")
    values = _json_objects(text)
    if not values:
        raise ValueError("no call")
    calls = []
    for value in values:
        if not isinstance(value, dict):
            raise ValueError("a tool call is a JSON object")
        calls.append(_named(value.get("name"), value.get("parameters", value.get("arguments", {}))))
    return calls


_MISTRAL_HEADER = re.compile(r"\s*([\w.-]+)\s*(?:\[CALL_ID\]\s*[\w-]*\s*)?\[ARGS\]\s*")


def parse_mistral(text: str, tools: Any = None) -> list[Call]:
    """After `[TOOL_CALLS]`: `NAME[ARGS]{...}` (Mistral Small 3.2 may put `[CALL_ID]id` before `[ARGS]`;
    Devstral, Ministral), or a JSON list `[{"name", "arguments"}]` (older Mistral templates)."""
    stripped = text.strip()
    if stripped.startswith("["):
        value = json.loads(stripped)
        if not isinstance(value, list) or not value:
            raise ValueError("no call")
        return [_named(v.get("name"), v.get("arguments", {})) for v in value]
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(text) and text[at:].strip():
        match = _MISTRAL_HEADER.match(text, at)
        if match is None:
            raise ValueError("not a Mistral call")
        arguments, at = decoder.raw_decode(text, match.end())
        calls.append(_named(match.group(1), arguments))
    if not calls:
        raise ValueError("no call")
    return calls


DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_SEP, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"


def parse_deepseek_v31(text: str, tools: Any = None) -> list[Call]:
    """DeepSeek-V3.1: `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{args}<｜tool▁call▁end｜>`, repeated."""
    calls = []
    for piece in text.split(DS_CALL_BEGIN)[1:]:
        body = piece.split(DS_CALL_END, 1)[0]
        name, sep, arguments = body.partition(DS_SEP)
        if not sep:
            raise ValueError("no separator")
        calls.append(_named(name.strip(), json.loads(arguments)))
    if not calls:
        raise ValueError("no call")
    return calls


DSML = "｜DSML｜"
_DSML_INVOKE = re.compile(rf'<{DSML}invoke name="([^"]+)">(.*?)</{DSML}invoke>', re.DOTALL)
_DSML_PARAM = re.compile(rf'<{DSML}parameter name="([^"]+)" string="(true|false)">(.*?)</{DSML}parameter>', re.DOTALL)


_FENCE = re.compile(r"\A\s*```(?:json)?\s*(.*?)\s*```\s*\Z", re.DOTALL)


def parse_deepseek_r1(text: str, tools: Any = None) -> list[Call]:
    """DeepSeek-R1 distills: `<｜tool▁call▁begin｜>TYPE<｜tool▁sep｜>NAME` newline ```json newline {args} newline
    ``` `<｜tool▁call▁end｜>`, repeated (line breaks between calls); the fence may be missing."""
    calls = []
    for piece in text.split(DS_CALL_BEGIN)[1:]:
        body = piece.split(DS_CALL_END, 1)[0]
        _kind, sep, rest = body.partition(DS_SEP)
        if not sep:
            raise ValueError("no separator")
        name, _, arguments = rest.partition("\n")
        fenced = _FENCE.match(arguments)
        calls.append(_named(name.strip(), json.loads(fenced.group(1) if fenced else arguments)))
    if not calls:
        raise ValueError("no call")
    return calls


def parse_dsml(text: str, tools: Any = None) -> list[Call]:
    """DeepSeek-V3.2: `<｜DSML｜invoke name="N"><｜DSML｜parameter name="K" string="true|false">V</...>`."""
    calls = []
    for name, body in _DSML_INVOKE.findall(text):
        arguments = {
            key: value if is_string == "true" else json.loads(value)
            for key, is_string, value in _DSML_PARAM.findall(body)
        }
        calls.append(_named(name, arguments))
    if not calls:
        raise ValueError("no call")
    return calls


def parse_functionary31(text: str, tools: Any = None) -> Call:
    """Functionary v3.1: between `<function=` and `</function>`: `NAME>{args}`."""
    name, sep, arguments = text.partition(">")
    if not sep:
        raise ValueError("no name")
    return _named(name.strip(), json.loads(arguments) if arguments.strip() else {})


def parse_functionary32(text: str, tools: Any = None) -> Call:
    """Functionary v3.2: after `>>>`: `NAME`, a line break, `{args}` (`all` is the text recipient, no call)."""
    name, sep, arguments = text.partition("\n")
    name = name.strip()
    if not sep or name == "all":
        raise ValueError("not a call")
    return _named(name, json.loads(arguments) if arguments.strip() else {})


# Kimi K3's XTML: `<|open|>TAG attrs<|sep|>` ... `<|close|>TAG<|sep|>`; the answer sits in a response element
K3_TOOLS_OPEN, K3_TOOLS_CLOSE = "<|open|>tools<|sep|>", "<|close|>tools<|sep|>"
K3_HIDDEN = ("<|open|>response<|sep|>", "<|close|>response<|sep|>", "<|close|>message<|sep|>")


def _mlx_lm_parser(module: str) -> Parse:
    """mlx-lm's parser for a format it ships (its output normalized to our call shape)."""

    def parse(text: str, tools: Any = None) -> Call | list[Call]:
        import importlib

        value = importlib.import_module(f"mlx_lm.tool_parsers.{module}").parse_tool_call(text, tools)
        values = value if isinstance(value, list) else [value]
        return [_named(v.get("name"), v.get("arguments", {})) for v in values]

    return parse


def parse_longcat(text: str, tools: Any = None) -> Call | list[Call]:
    """LongCat: `NAME` then `<longcat_arg_key>K</longcat_arg_key><longcat_arg_value>V</...>` pairs (mlx-lm's
    parser); a call without arguments is the name alone, which that parser cannot read."""
    if "<longcat_arg_key>" not in text and not text.strip().startswith("{"):
        return _named(text.strip(), {})
    return _mlx_lm_parser("longcat")(text, tools)


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("hermes", "<tool_call>", "</tool_call>", parse_hermes),
        FormatSpec("qwen3_coder", "<tool_call>", "</tool_call>", _mlx_lm_parser("qwen3_coder")),
        FormatSpec("glm47", "<tool_call>", "</tool_call>", _mlx_lm_parser("glm47")),
        FormatSpec("mistral", "[TOOL_CALLS]", "", parse_mistral),
        FormatSpec("llama3", "", "", parse_llama3, leads=("{", "<|python_tag|>")),
        FormatSpec("deepseek_v31", DS_CALLS_BEGIN, DS_CALLS_END, parse_deepseek_v31),
        FormatSpec("deepseek_r1", DS_CALLS_BEGIN, DS_CALLS_END, parse_deepseek_r1),
        FormatSpec("pythonic", "<|tool_call_start|>", "<|tool_call_end|>", _mlx_lm_parser("pythonic")),
        FormatSpec("function_gemma", "<start_function_call>", "<end_function_call>", _mlx_lm_parser("function_gemma")),
        FormatSpec("dsml", f"<{DSML}function_calls>", f"</{DSML}function_calls>", parse_dsml),
        FormatSpec("functionary31", "<function=", "</function>", parse_functionary31),
        FormatSpec("functionary32", ">>>", "", parse_functionary32, opened=True, text_recipient="all\n"),
        FormatSpec("kimi_k2", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", _mlx_lm_parser("kimi_k2")),
        FormatSpec("minimax_m2", "<minimax:tool_call>", "</minimax:tool_call>", _mlx_lm_parser("minimax_m2")),
        FormatSpec("gemma4", "<|tool_call>", "<tool_call|>", _mlx_lm_parser("gemma4")),
        FormatSpec("minicpm5", "<function name=", "</function>", _mlx_lm_parser("minicpm5")),
        FormatSpec("muse_spark", "<atem:function_calls>", "</atem:function_calls>", _mlx_lm_parser("muse_spark")),
        FormatSpec("kimi_k3", K3_TOOLS_OPEN, K3_TOOLS_CLOSE, _mlx_lm_parser("kimi_k3"), hidden=K3_HIDDEN),
        FormatSpec("longcat", "<longcat_tool_call>", "</longcat_tool_call>", parse_longcat),
    )
}


_EXAMPLES = {
    "hermes": '<tool_call>{"name": "<function name>", "arguments": {<arguments as JSON>}}</tool_call>',
    "deepseek_v31": f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}<function name>{DS_SEP}{{<arguments as JSON>}}{DS_CALL_END}{DS_CALLS_END}",
    "deepseek_r1": f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}<function name>\n```json\n{{<arguments as JSON>}}\n```"
    f"{DS_CALL_END}{DS_CALLS_END}",
}


def call_example(name: str) -> str:
    """How a call is written in format `name`, for tool instructions in a system message."""
    return _EXAMPLES.get(name, _EXAMPLES["hermes"])


def detect_format(template: str) -> str | None:
    """The native format a chat template writes its assistant tool calls in, or None."""
    checks: tuple[tuple[str, Callable[[str], bool]], ...] = (
        ("minimax_m2", lambda t: "<minimax:tool_call>" in t),
        ("kimi_k3", lambda t: "open_tag('tools')" in t and "'<|open|>'" in t),
        ("gemma4", lambda t: "<|tool_call>" in t and "<tool_call|>" in t),
        ("dsml", lambda t: DSML in t),
        ("function_gemma", lambda t: "<start_function_call>" in t),
        ("longcat", lambda t: "<longcat_tool_call>" in t),
        ("muse_spark", lambda t: "<atem:function_calls>" in t),
        ("minicpm5", lambda t: '<function name="' in t and '<param name="' in t),
        ("pythonic", lambda t: "<|tool_list_start|>" in t or "<|tool_call_start|>" in t),
        ("glm47", lambda t: "<arg_key>" in t),
        ("qwen3_coder", lambda t: "<tool_call>\\n<function=" in t or "<tool_call>\n<function=" in t),
        ("kimi_k2", lambda t: "<|tool_calls_section_begin|>" in t),
        ("mistral", lambda t: "[TOOL_CALLS]" in t),
        ("deepseek_r1", lambda t: DS_CALL_BEGIN in t and "```json" in t),
        ("deepseek_v31", lambda t: f"{DS_CALL_BEGIN}'+ tool['function']['name']" in t.replace("' + tool", "'+ tool")),
        ("functionary31", lambda t: "<function=" in t and "<|python_tag|>" in t),
        ("functionary32", lambda t: "'>>>' + tool_call['function']['name']" in t),
        ("hermes", lambda t: "<tool_call>" in t and "tool_call" in t.replace("<tool_call>", "")),
        ("llama3", lambda t: '"parameters": dictionary of argument name' in t),
    )
    for name, matches in checks:
        if matches(template):
            return name
    return None


__all__ = ["FORMATS", "FormatSpec", "call_example", "detect_format"]
