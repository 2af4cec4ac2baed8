"""The forcing grammar: `tool_choice` "required" or a named function as a llguidance Lark grammar.

A forced Hermes-format call is the start marker, at most one line break, one compact JSON object
`{"name":<one of the chosen tools>,"arguments":<its parameters>}`, at most one line
break, the end marker; then only EOS. Compact JSON (no whitespace between JSON tokens)
keeps a small model from spending `max_tokens` on pretty-printing. A marker that is one
added token of the tokenizer (`<tool_call>` is id 151657 in Qwen's vocabularies) is
written as a token reference, `<[151657]>`: llguidance holds added tokens apart from
text, so the quoted text `"<tool_call>"` would force the token and then reject it.

Each tool's `parameters` are checked on their own first, so a schema the grammar cannot
enforce is a 400 naming the tool and the keyword (never the grammar's source). Native formats
(Llama 3.x, Mistral, Qwen3-Coder, DeepSeek, GLM, Kimi-K2, MiniMax, Gemma 4, ...) are forced in their own
markup by the grammars of `tool_format_grammars`. As for
`response_format`, a non-strict tool (`strict` absent or false) has the keywords
llguidance does not implement (`uniqueItems`, ...) ignored; a strict one is refused.

gpt-oss writes calls in its harmony format instead (`harmony_lark_text`): an optional analysis message,
then `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>` and the arguments as one
compact JSON object of the tool's parameters; the grammar ends there, and so does the generation (the
`<|call|>` that would follow is an EOS token). The analysis is bounded (`HARMONY_ANALYSIS_CHARS`) so a
model that will not stop reasoning still reaches its call. Its `response_format` likewise applies to
the final message after the optional analysis (`harmony_answer_grammar`).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

from server.engine import GrammarSpec
from server.errors import APIError, InvalidRequestError
from server.serving.harmony import CHANNEL, CONSTRAIN, END, FUNCTIONS, HARMONY_FORMAT, MESSAGE, START
from server.serving.tool_format_grammars import format_lark
from server.serving.tools import ToolFormat

log = logging.getLogger(__name__)

HARMONY_ANALYSIS_CHARS = 8192  # the most reasoning a forced harmony call may write before its call

# $defs hoisted from a tool's parameters to the call schema's root, where `#/$defs/...` refs resolve
_DEFINITIONS = ("$defs", "definitions")


class GrammarValidator(Protocol):
    """What the forcing grammar is checked with (a model's `ConstraintFactory`)."""

    @property
    def tokenizer(self) -> Any: ...  # raises ValueError when the model's tokenizer cannot be constrained

    def validate(self, spec: GrammarSpec) -> None: ...


def chosen_tools(tools: list[dict[str, Any]], forced: str | None) -> list[tuple[int, dict[str, Any]]]:
    """(index in `tools`, tool) of the tools a forced call may use: the named one, else all."""
    return [(i, t) for i, t in enumerate(tools) if forced is None or t["function"]["name"] == forced]


def _parameters(tool: dict[str, Any], index: int) -> dict[str, Any]:
    parameters = tool["function"].get("parameters")
    if parameters is None:
        return {"type": "object"}
    if not isinstance(parameters, dict):
        raise InvalidRequestError(
            "A function's 'parameters' must be a JSON Schema object.", param=f"tools[{index}].function.parameters"
        )
    return parameters


def call_schema(tool: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """The JSON schema of one call of `tool`: {"name": its name, "arguments": its parameters}.

    The parameters' `$defs`/`definitions` move to the root so their `#/$defs/...` refs still resolve.
    Arguments a tool does not declare are useless to it (small models invent them and run on), so an
    object with `properties` gets `additionalProperties: false` unless it says otherwise."""
    arguments = dict(_parameters(tool, index))
    arguments.pop("$schema", None)
    hoisted = {key: arguments.pop(key) for key in _DEFINITIONS if key in arguments}
    if "properties" in arguments:
        arguments.setdefault("additionalProperties", False)
    schema = {
        "type": "object",
        "properties": {"name": {"const": tool["function"]["name"]}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    return {**hoisted, **schema}


def _strict(tool: dict[str, Any]) -> bool:
    return tool["function"].get("strict") is True


def marker(text: str, tokenizer: Any) -> str:
    """A Lark terminal for a tool-call marker: `<[id]>` when it is one added token, else quoted text."""
    added = _added_vocab(tokenizer)
    token_id = added.get(text)
    if token_id is not None:
        return f"<[{int(token_id)}]>"
    return json.dumps(text)


def _added_vocab(tokenizer: Any) -> dict[str, int]:
    getter = getattr(tokenizer, "get_added_vocab", None)
    if getter is None:
        return {}
    try:
        vocab = getter()
    except (AttributeError, TypeError, ValueError):
        return {}
    return vocab if isinstance(vocab, dict) else {}


def _check_parameters(tool: dict[str, Any], index: int, validator: GrammarValidator) -> None:
    """A 400 naming the tool and the reason when its parameters cannot be enforced."""
    strict = _strict(tool)
    try:
        validator.validate(GrammarSpec.json_schema(_parameters(tool, index), strict=strict))
    except ValueError as exc:
        raise InvalidRequestError(
            f"The parameters of function '{tool['function']['name']}' cannot be enforced for a forced tool call: {exc}",
            param=f"tools[{index}].function.parameters",
            code="invalid_function_parameters",
        ) from None


def arguments_schema(tool: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """The JSON schema of a call's arguments alone, its `$defs` kept at its root (native formats)."""
    schema = call_schema(tool, index)
    arguments = dict(schema["properties"]["arguments"])
    return {**{key: schema[key] for key in _DEFINITIONS if key in schema}, **arguments}


def lark_text(fmt: ToolFormat, chosen: list[tuple[int, dict[str, Any]]], tokenizer: Any) -> str:
    """The Lark source: markers, at most one line break either side, one compact JSON call of a chosen tool
    (Hermes); a native format's own grammar (`tool_format_grammars`) for the others."""
    if not fmt.json_calls:
        return format_lark(fmt.name, chosen, lambda text: marker(text, tokenizer), arguments_schema)
    lines = [
        f"start: {marker(fmt.start, tokenizer)} NL? call NL? {marker(fmt.end, tokenizer)}",
        'NL: "\\n"',
        "call: " + " | ".join(f"tool_{k}" for k in range(len(chosen))),
    ]
    for k, (index, tool) in enumerate(chosen):
        lines.append(f"tool_{k}: {_json_rule(tool, call_schema(tool, index))}")
    return "\n".join(lines) + "\n"


def _json_rule(tool: dict[str, Any], schema: dict[str, Any]) -> str:
    schema["x-guidance"] = {"whitespace_flexible": False, "lenient": not _strict(tool)}
    return f"%json {json.dumps(schema, ensure_ascii=False)}"


def _harmony_analysis(tokenizer: Any) -> list[str]:
    """Lark rules of an optional analysis message (bounded) and the next message's start."""
    ch, msg, end, start = (marker(t, tokenizer) for t in (CHANNEL, MESSAGE, END, START))
    return [
        f'analysis: {ch} "analysis" {msg} REASONING {end} {start} "assistant"',
        f"REASONING: /(?s:.{{0,{HARMONY_ANALYSIS_CHARS}}})/",
    ]


def harmony_lark_text(chosen: list[tuple[int, dict[str, Any]]], tokenizer: Any) -> str:
    """The Lark source of a forced harmony call: optional analysis, then the commentary call of a chosen tool."""
    ch, msg, constrain = (marker(t, tokenizer) for t in (CHANNEL, MESSAGE, CONSTRAIN))
    lines = [
        "start: analysis? call",
        *_harmony_analysis(tokenizer),
        f'call: {ch} "commentary to={FUNCTIONS}" (' + " | ".join(f"tool_{k}" for k in range(len(chosen))) + ")",
    ]
    for k, (index, tool) in enumerate(chosen):
        name = json.dumps(tool["function"]["name"])
        arguments = call_schema(tool, index)
        schema = {**{d: arguments[d] for d in _DEFINITIONS if d in arguments}, **arguments["properties"]["arguments"]}
        lines.append(f'tool_{k}: {name} " " {constrain} "json" {msg} args_{k}')
        lines.append(f"args_{k}: {_json_rule(tool, schema)}")
    return "\n".join(lines) + "\n"


def harmony_answer_grammar(spec: GrammarSpec, tokenizer: Any) -> GrammarSpec:
    """`response_format` for a harmony model: optional analysis, then the final message's JSON (compact).

    Regex and Lark specs are returned as they are (they are the caller's own grammar of the whole output)."""
    if spec.kind not in ("json_object", "json_schema"):
        return spec
    schema: dict[str, Any] = dict(spec.schema or {}) if spec.kind == "json_schema" else {"type": "object"}
    schema.setdefault("x-guidance", {"whitespace_flexible": False, "lenient": not spec.strict})
    ch, msg = marker(CHANNEL, tokenizer), marker(MESSAGE, tokenizer)
    lines = [
        "start: analysis? final",
        *_harmony_analysis(tokenizer),
        f'final: {ch} "final" {msg} answer',
        f"answer: %json {json.dumps(schema, ensure_ascii=False)}",
    ]
    return GrammarSpec(kind="lark", text="\n".join(lines) + "\n", strict=spec.strict)


def forcing_grammar(
    tools: list[dict[str, Any]], forced: str | None, fmt: ToolFormat, tokenizer: Any, validator: GrammarValidator
) -> GrammarSpec:
    """The grammar that forces one call of `forced` (or any tool), checked against the model's tokenizer.

    Raises InvalidRequestError when a tool's parameters cannot be enforced, and an APIError (500, logged)
    when the grammar built from valid parameters does not compile: that is this server's bug."""
    try:
        validator.tokenizer
    except ValueError as exc:
        raise InvalidRequestError(
            f"Forced tool calls are not available for this model: {exc}", param="tool_choice"
        ) from None
    chosen = chosen_tools(tools, forced)
    for index, tool in chosen:
        _check_parameters(tool, index, validator)
    text = harmony_lark_text(chosen, tokenizer) if fmt == HARMONY_FORMAT else lark_text(fmt, chosen, tokenizer)
    spec = GrammarSpec(kind="lark", text=text, strict=False)
    try:
        validator.validate(spec)
    except ValueError as exc:
        log.error("the forcing grammar did not compile: %s\n%s", exc, spec.text)
        raise APIError(
            "The server could not build the grammar for this forced tool call.", code="tool_grammar_failed"
        ) from None
    return spec


__all__ = [
    "arguments_schema",
    "call_schema",
    "chosen_tools",
    "forcing_grammar",
    "harmony_answer_grammar",
    "harmony_lark_text",
    "lark_text",
    "marker",
]
