"""Forcing grammars in each native format: one call of a chosen tool, written the way the model writes it.

`format_lark(name, chosen, marker, arguments)` returns the Lark source for format `name` (see
`tool_formats.FORMATS`): `marker(text)` gives a marker's terminal (a token reference when it is one added
token), `arguments(tool, index)` the JSON schema of a tool's arguments. JSON-argument formats (Llama 3.x,
Mistral, DeepSeek-V3.1, the DeepSeek-R1 distills' fenced JSON, Kimi-K2, Functionary) embed that schema
with `%json`; keyword formats (pythonic, function_gemma) are in `tool_keyword_grammars`; XML-argument formats
(Qwen3-Coder, GLM and Laguna, MiniMax, DeepSeek-V3.2 DSML, Gemma 4, MiniCPM5, Muse Spark, LongCat) write one element per property, in the order the
schema declares them (required ones always, optional ones at most once), a string value as raw text (one of
its `enum` values when it has one) and any other value as compact JSON for its sub-schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.serving.tool_keyword_grammars import DEFINITIONS as _DEFS
from server.serving.tool_keyword_grammars import Arguments, Chosen, Marker, function_gemma, pythonic
from server.serving.tool_keyword_grammars import json_rule as _json_rule
from server.serving.tool_keyword_grammars import quoted as _q


def _lenient(tool: dict[str, Any]) -> bool:
    return tool["function"].get("strict") is not True


def _alternatives(chosen: Chosen) -> str:
    return "call: " + " | ".join(f"tool_{k}" for k in range(len(chosen)))


def _json_args_format(
    head: str, tail: str, call: Callable[[str, str], str], chosen: Chosen, arguments: Arguments
) -> list[str]:
    """start: head call tail; tool_k: call(quoted name, args rule)."""
    lines = [f"start: {head} call {tail}".strip(), _alternatives(chosen)]
    for k, (index, tool) in enumerate(chosen):
        lines.append(f"tool_{k}: {call(tool['function']['name'], f'args_{k}')}")
        lines.append(_json_rule(f"args_{k}", arguments(tool, index), _lenient(tool)))
    return lines


def _llama3(chosen: Chosen, marker: Marker, arguments: Arguments) -> list[str]:
    lines = ["start: call", _alternatives(chosen)]
    for k, (index, tool) in enumerate(chosen):
        args = arguments(tool, index)
        hoisted = {key: args.pop(key) for key in _DEFS if key in args}
        schema = {
            **hoisted,
            "type": "object",
            "properties": {"name": {"const": tool["function"]["name"]}, "parameters": args},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        lines.append(_json_rule(f"tool_{k}", schema, _lenient(tool)))
    return lines


def _string_value(schema: dict[str, Any]) -> str | None:
    """A Lark expression for a raw string value, or None when the value is not a string."""
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return "(" + " | ".join(_q(v) for v in enum) + ")"
    if "const" in schema and isinstance(schema["const"], str):
        return _q(schema["const"])
    if schema.get("type") == "string" and not enum:
        limit = schema.get("maxLength")
        return f"/[^<]{{0,{int(limit)}}}/" if isinstance(limit, int) else "/[^<]*/"
    return None


def _xml_params(
    k: int,
    args: dict[str, Any],
    lenient: bool,
    element: Callable[[str, str, bool], str],
    separator: str = "",
) -> tuple[str, list[str]]:
    """The parameters' sequence for tool k, and the rules it needs. element(key, value, is_string)."""
    hoisted = {key: args[key] for key in _DEFS if key in args}
    required = set(args.get("required") or [])
    parts, rules = [], []
    for p, (key, schema) in enumerate((args.get("properties") or {}).items()):
        schema = schema if isinstance(schema, dict) else {}
        value = _string_value(schema)
        if value is None:
            rules.append(_json_rule(f"v_{k}_{p}", {**hoisted, **schema}, lenient))
            value = f"v_{k}_{p}"
        rules.append(f"p_{k}_{p}: {element(key, value, _string_value(schema) is not None)}")
        parts.append(f"p_{k}_{p}" if key in required else f"p_{k}_{p}?")
    if separator and parts:  # Gemma 4: comma-separated; the optional ones make exact commas hard, so all required
        return f" {separator} ".join(p.rstrip("?") for p in parts), rules
    return " ".join(parts), rules


def _xml_format(
    head: str,
    tail: str,
    open_call: Callable[[str], str],
    close_call: str,
    element: Callable[[str, str, bool], str],
    chosen: Chosen,
    arguments: Arguments,
    separator: str = "",
) -> list[str]:
    lines = [f"start: {head} call {tail}", _alternatives(chosen)]
    for k, (index, tool) in enumerate(chosen):
        params, rules = _xml_params(k, arguments(tool, index), _lenient(tool), element, separator)
        lines.append(f"tool_{k}: {open_call(tool['function']['name'])} {params} {close_call}")
        lines.extend(rules)
    return lines


Builder = Callable[[Chosen, Marker, Arguments], list[str]]


def _mistral(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    return _json_args_format(m("[TOOL_CALLS]"), "", lambda n, a: f"{_q(n)} {m('[ARGS]')} {a}", chosen, arguments)


def _deepseek_v31(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    begin, sep, end = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
    return _json_args_format(
        m("<｜tool▁calls▁begin｜>"),
        m("<｜tool▁calls▁end｜>"),
        lambda n, a: f"{m(begin)} {_q(n)} {m(sep)} {a} {m(end)}",
        chosen,
        arguments,
    )


def _deepseek_r1(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    """`function<｜tool▁sep｜>NAME` newline, the arguments in a ```json fence (the R1 distills' templates)."""
    begin, sep, end = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
    return _json_args_format(
        m("<｜tool▁calls▁begin｜>"),
        m("<｜tool▁calls▁end｜>"),
        lambda n, a: f'{m(begin)} "function" {m(sep)} {_q(n + chr(10) + "```json" + chr(10))} {a} "\\n```" {m(end)}',
        chosen,
        arguments,
    )


def _kimi_k2(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    return _json_args_format(
        m("<|tool_calls_section_begin|>"),
        m("<|tool_calls_section_end|>"),
        lambda n, a: (
            f"{m('<|tool_call_begin|>')} {_q(f'functions.{n}:0')} "
            f"{m('<|tool_call_argument_begin|>')} {a} {m('<|tool_call_end|>')}"
        ),
        chosen,
        arguments,
    )


def _functionary31(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    return _json_args_format(m("<function="), m("</function>"), lambda n, a: f"{_q(n + '>')} {a}", chosen, arguments)


def _functionary32(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    """The generation prompt already ends with `>>>`: the call is `NAME` newline `{args}`."""
    return _json_args_format("", "", lambda n, a: f"{_q(n + chr(10))} {a}", chosen, arguments)


def _qwen3_coder(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    return _xml_format(
        m("<tool_call>"),
        m("</tool_call>"),
        lambda n: _q(f"\n<function={n}>\n"),
        _q("</function>\n"),
        lambda key, value, s: _q("<parameter=" + key + ">\n") + f" {value} " + _q("\n</parameter>\n"),
        chosen,
        arguments,
    )


def _glm47(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    return _xml_format(
        m("<tool_call>"),
        m("</tool_call>"),
        lambda n: _q(n),
        "",
        lambda key, value, s: (
            f"{m('<arg_key>')} {_q(key)} {m('</arg_key>')} {m('<arg_value>')} {value} {m('</arg_value>')}"
        ),
        chosen,
        arguments,
    )


def _minimax_m2(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    return _xml_format(
        m("<minimax:tool_call>"),
        m("</minimax:tool_call>"),
        lambda n: _q(f'\n<invoke name="{n}">\n'),
        _q("</invoke>\n"),
        lambda key, value, s: _q('<parameter name="' + key + '">') + f" {value} " + _q("</parameter>\n"),
        chosen,
        arguments,
    )


def _dsml(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    d = "｜DSML｜"
    return _xml_format(
        m(f"<{d}function_calls>"),
        m(f"</{d}function_calls>"),
        lambda n: _q(f'\n<{d}invoke name="{n}">\n'),
        _q(f"</{d}invoke>\n"),
        lambda key, value, s: (
            _q(f'<{d}parameter name="{key}" string="{str(s).lower()}">')
            + f" {value} "
            + _q(f"</{d}parameter>")
            + ' "\\n"'
        ),
        chosen,
        arguments,
    )


def _gemma4(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    quote = m('<|"|>')
    return _xml_format(
        m("<|tool_call>"),
        m("<tool_call|>"),
        lambda n: _q(f"call:{n}{{"),
        _q("}"),
        lambda key, value, s: f"{_q(key + ':')} {f'{quote} {value} {quote}' if s else value}",
        chosen,
        arguments,
        separator='","',
    )


def _minicpm5(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    """`<function name="N"><param name="K">V</param>...</function>`, no outer wrapper."""
    return _xml_format(
        "",
        "",
        lambda n: f"{m('<function name=')} {_q(chr(34) + n + chr(34) + '>')}",
        m("</function>"),
        lambda key, value, s: _q(f'<param name="{key}">') + f" {value} " + _q("</param>"),
        chosen,
        arguments,
    )


def _muse_spark(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    return _xml_format(
        m("<atem:function_calls>"),
        m("</atem:function_calls>"),
        lambda n: _q(f'\n<atem:invoke name="{n}">\n'),
        _q("</atem:invoke>\n"),
        lambda key, value, s: _q(f'<atem:parameter name="{key}">') + f" {value} " + _q("</atem:parameter>\n"),
        chosen,
        arguments,
    )


def _longcat(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    return _xml_format(
        m("<longcat_tool_call>"),
        m("</longcat_tool_call>"),
        lambda n: _q(n + "\n"),
        "",
        lambda key, value, s: (
            f"{m('<longcat_arg_key>')} {_q(key)} {m('</longcat_arg_key>')} {_q(chr(10))} "
            f"{m('<longcat_arg_value>')} {value} {m('</longcat_arg_value>')} {_q(chr(10))}"
        ),
        chosen,
        arguments,
    )


def _kimi_k3(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    """Kimi K3 XTML: the response element (opened by the prompt, or after the reasoning) closed, then `<|open|>tools<|sep|>`, one call whose arguments are
    typed elements (`<|open|>argument key="K" type="T"<|sep|>V<|close|>argument<|sep|>`)."""
    o, c, sep = m("<|open|>"), m("<|close|>"), m("<|sep|>")
    kinds = '("number" | "boolean" | "object" | "array" | "null")'

    def element(key: str, value: str, is_string: bool) -> str:
        kind = '"string"' if is_string else kinds
        return f'{o} {_q("argument key=" + _q(key) + " type=")} "\\"" {kind} "\\"" {sep} {value} {c} "argument" {sep}'

    def open_call(name: str) -> str:
        return f"{o} {_q('call tool=' + _q(name) + ' index=' + _q('1'))} {sep}"

    return _xml_format(
        f'({o} "response" {sep})? {c} "response" {sep} {o} "tools" {sep}',  # opened after the reasoning
        f'{c} "tools" {sep}',
        open_call,
        f'{c} "call" {sep}',
        element,
        chosen,
        arguments,
    )


# each format's grammar builder (format names as in `tool_formats.FORMATS`)
_BUILDERS: dict[str, Builder] = {
    "llama3": _llama3,
    "mistral": _mistral,
    "deepseek_v31": _deepseek_v31,
    "deepseek_r1": _deepseek_r1,
    "pythonic": pythonic,
    "function_gemma": function_gemma,
    "kimi_k2": _kimi_k2,
    "functionary31": _functionary31,
    "functionary32": _functionary32,
    "qwen3_coder": _qwen3_coder,
    "glm47": _glm47,
    "minimax_m2": _minimax_m2,
    "dsml": _dsml,
    "gemma4": _gemma4,
    "minicpm5": _minicpm5,
    "muse_spark": _muse_spark,
    "longcat": _longcat,
    "kimi_k3": _kimi_k3,
}


def format_lark(name: str, chosen: Chosen, marker: Marker, arguments: Arguments) -> str:
    """The Lark source forcing one call in format `name`."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"no forcing grammar for the tool-call format {name!r}")
    return "\n".join(builder(chosen, marker, arguments)) + "\n"


__all__ = ["format_lark"]
