"""Forcing grammars for the keyword-argument call formats: pythonic (LFM2) and function_gemma.

pythonic: `<|tool_call_start|>[NAME(key=value, ...)]<|tool_call_end|>`, each value a Python literal that
is also JSON where it can be: a string in double quotes, a number, `True`/`False`/`None` for a boolean or
null property, and a list or dict as compact JSON (mlx-lm's parser reads `true`/`false`/`null` inside
them). function_gemma: `<start_function_call>call:NAME{key:<escape>text<escape>,key:value}<end_function_call>`,
a string as raw text between `<escape>` markers, anything else compact JSON.

Keywords come in the order the schema declares its properties: the required ones always, the optional
ones at most once, with exactly one separator between two that are written. The builders take the same
arguments as those of `tool_format_grammars` (chosen tools, marker terminal, arguments schema).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

Marker = Callable[[str], str]
Arguments = Callable[[dict[str, Any], int], dict[str, Any]]
Chosen = list[tuple[int, dict[str, Any]]]
Value = Callable[[str, dict[str, Any], bool], tuple[str, list[str]]]  # (rule, schema, lenient) -> expr, rules
DEFINITIONS = ("$defs", "definitions")


def quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def json_rule(rule: str, schema: dict[str, Any], lenient: bool) -> str:
    schema = {**schema, "x-guidance": {"whitespace_flexible": False, "lenient": lenient}}
    return f"{rule}: %json {json.dumps(schema, ensure_ascii=False)}"


def keyword_sequence(parts: list[tuple[str, bool]], separator: str) -> str:
    """A Lark expression: the rules in `parts` in order, (rule, required), the optional ones at most once,
    one `separator` between two written ones ("" when nothing may be written)."""
    sep = quoted(separator)
    tail, first = "", ""  # from part i+1 on: after something was written / before anything was
    for rule, required in reversed(parts):
        if required:
            tail, first = f"{sep} {rule} {tail}".strip(), f"{rule} {tail}".strip()
        else:
            head = f"{rule} {tail}".strip()
            first = f"({head} | {first})" if first else f"({head})?"
            tail = f"({sep} {rule})? {tail}".strip()
    return first


def _keyword_call(
    k: int,
    args: dict[str, Any],
    lenient: bool,
    key: Callable[[str], str],
    value: Value,
    separator: str,
) -> tuple[str, list[str]]:
    """Tool k's keyword sequence and the rules it needs."""
    hoisted = {name: args[name] for name in DEFINITIONS if name in args}
    required = set(args.get("required") or [])
    parts: list[tuple[str, bool]] = []
    rules: list[str] = []
    for p, (name, schema) in enumerate((args.get("properties") or {}).items()):
        schema = schema if isinstance(schema, dict) else {}
        expr, needed = value(f"v_{k}_{p}", {**hoisted, **schema}, lenient)
        rules += [*needed, f"p_{k}_{p}: {key(name)} {expr}"]
        parts.append((f"p_{k}_{p}", name in required))
    return keyword_sequence(parts, separator), rules


def _keyword_format(
    head: str,
    tail: str,
    open_call: Callable[[str], str],
    close_call: str,
    key: Callable[[str], str],
    value: Value,
    separator: str,
    chosen: Chosen,
    arguments: Arguments,
) -> list[str]:
    lines = [f"start: {head} call {tail}", "call: " + " | ".join(f"tool_{k}" for k in range(len(chosen)))]
    for k, (index, tool) in enumerate(chosen):
        lenient = tool["function"].get("strict") is not True
        params, rules = _keyword_call(k, arguments(tool, index), lenient, key, value, separator)
        lines.append(f"tool_{k}: {open_call(tool['function']['name'])} {params} {close_call}")
        lines.extend(rules)
    return lines


def _python_value(rule: str, schema: dict[str, Any], lenient: bool) -> tuple[str, list[str]]:
    kind = schema.get("type")
    if kind == "boolean":
        return '("True" | "False")', []
    if kind == "null":
        return '"None"', []
    return rule, [json_rule(rule, schema, lenient)]


def pythonic(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    """`[NAME(key=value, ...)]` between the markers."""
    return _keyword_format(
        f'{m("<|tool_call_start|>")} "["',
        f'"]" {m("<|tool_call_end|>")}',
        lambda n: quoted(f"{n}("),
        '")"',
        lambda name: quoted(f"{name}="),
        _python_value,
        ", ",
        chosen,
        arguments,
    )


def function_gemma(chosen: Chosen, m: Marker, arguments: Arguments) -> list[str]:
    """`call:NAME{key:<escape>text<escape>,key:json}` between the markers."""
    escape = m("<escape>")

    def value(rule: str, schema: dict[str, Any], lenient: bool) -> tuple[str, list[str]]:
        if schema.get("type") == "string" and "enum" not in schema:
            return f"{escape} /[^<]*/ {escape}", []
        enum = schema.get("enum")
        if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
            return f"{escape} (" + " | ".join(quoted(v) for v in enum) + f") {escape}", []
        return rule, [json_rule(rule, schema, lenient)]

    return _keyword_format(
        m("<start_function_call>"),
        m("<end_function_call>"),
        lambda n: quoted(f"call:{n}{{"),
        '"}"',
        lambda name: quoted(f"{name}:"),
        value,
        ",",
        chosen,
        arguments,
    )


__all__ = ["function_gemma", "keyword_sequence", "pythonic"]
