"""What a request hands the chat template besides messages and tools: `chat_template_kwargs`,
OpenAI's reasoning effort mapped onto the template's own switch, past reasoning under the names
templates read (for gpt-oss, joined with a tool-call turn's preamble), and tool call ids and arguments in
the shape a template demands.

`chat_template_kwargs` (vLLM's name) is an object of extra template variables, passed through as
they are (`enable_thinking`, `reasoning_effort`, `thinking`, ...). Names the template machinery
owns (`messages`, `tools`, `add_generation_prompt`, special-token names, template globals) are
refused. Its strings are request text like any other: `render_prompt` keeps control-token text in
them as text.

`reasoning_effort` (chat) and `reasoning.effort` (Responses) become the variable the template
reads, and only where it reads one:

| the template reads  | it gets                                                           |
| ------------------- | ----------------------------------------------------------------- |
| `reasoning_effort`  | the effort as sent (gpt-oss: `Reasoning: high`)                    |
| `enable_thinking`   | `false` for `none` and `minimal`, else `true` (Qwen3, GLM, ...)    |
| `thinking`          | the same boolean (DeepSeek-V3.1/V3.2)                              |

A template that reads none of them renders as without the field. A key set in
`chat_template_kwargs` wins over the mapped value.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any

import jinja2
import jinja2.meta
from jinja2.ext import loopcontrols

from server.errors import InvalidRequestError
from server.serving.prompt import template_text

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
NO_THINKING = frozenset({"none", "minimal"})

# what apply_chat_template and the render itself put in the template's namespace
RESERVED = frozenset(
    {
        # apply_chat_template's own parameters (transformers) and mlx-lm's wrapper
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "processor_kwargs",
        "sanitize_control_tokens",
        # special tokens the tokenizer hands every template
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "sep_token",
        "cls_token",
        "mask_token",
        "additional_special_tokens",
        # template globals
        "raise_exception",
        "strftime_now",
        "namespace",
        "range",
        "dict",
        "lipsum",
        "cycler",
        "joiner",
    }
)

_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


@functools.lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    """The variables a chat template reads from its context (parsed once per template text)."""
    env = jinja2.Environment(extensions=[loopcontrols])
    try:  # transformers' `{% generation %}` marks training spans; it renders its body as is
        return frozenset(jinja2.meta.find_undeclared_variables(env.parse(_GENERATION_TAG.sub("", template))))
    except jinja2.TemplateSyntaxError:
        return frozenset(re.findall(r"\b(?:reasoning_effort|enable_thinking|thinking)\b", template))


def check_kwargs(given: dict[str, Any] | None, param: str = "chat_template_kwargs") -> dict[str, Any]:
    """`chat_template_kwargs` as sent, reserved names refused."""
    if not given:
        return {}
    reserved = sorted(k for k in given if k in RESERVED or k.startswith("__"))
    if reserved:
        raise InvalidRequestError(
            f"'{param}' may not set {', '.join(repr(k) for k in reserved)}: the server sets these itself.",
            param=param,
            code="invalid_value",
        )
    return dict(given)


def effort_kwargs(template: str, effort: str | None, param: str = "reasoning_effort") -> dict[str, Any]:
    """The template variable a reasoning effort becomes (see the module docstring); {} when it reads none."""
    if effort is None:
        return {}
    if effort not in EFFORTS:
        raise InvalidRequestError(
            f"Invalid value for '{param}': '{effort}'; expected one of {list(EFFORTS)}.",
            param=param,
            code="invalid_value",
        )
    variables = template_variables(template)
    if "reasoning_effort" in variables:
        return {"reasoning_effort": effort}
    thinking = effort not in NO_THINKING
    if "enable_thinking" in variables:
        return {"enable_thinking": thinking}
    if "thinking" in variables:
        return {"thinking": thinking}
    return {}


def template_kwargs(
    tokenizer: Any, given: dict[str, Any] | None, effort: str | None, *, effort_param: str = "reasoning_effort"
) -> dict[str, Any]:
    """The extra variables one render gets: the effort's mapping, overridden by `chat_template_kwargs`."""
    explicit = check_kwargs(given)
    return {**effort_kwargs(template_text(tokenizer), effort, effort_param), **explicit}


def past_reasoning(text: str) -> dict[str, str]:
    """An assistant message's past reasoning under the names templates read it by.

    `reasoning_content` (Qwen3, DeepSeek, GLM, Kimi, MiniMax), `thinking` (gpt-oss), `reasoning`
    (Solar, Hunyuan): what transformers' own aliasing gives, whichever transformers renders.
    """
    return {"reasoning_content": text, "thinking": text, "reasoning": text}


def one_analysis_per_call(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """gpt-oss's template renders an assistant tool-call turn's text as one analysis message and refuses
    a turn with both `content` (a preamble) and `thinking`: the two are joined, reasoning first, as the
    model wrote them, into `thinking`."""
    out = []
    for message in messages:
        thinking, content = message.get("thinking"), message.get("content")
        if message.get("tool_calls") and thinking and isinstance(content, str) and content.strip():
            message = {**message, **past_reasoning(f"{thinking}\n\n{content}"), "content": ""}
        out.append(message)
    return out


_NINE_CHAR_IDS = re.compile(
    r"length\s*!=\s*9"
)  # Mistral's templates: "Tool call IDs should be alphanumeric strings with length 9!"
_NINE_ALNUM = re.compile(r"[A-Za-z0-9]{9}")


def _nine_char_id(call_id: str) -> str:
    return call_id if _NINE_ALNUM.fullmatch(call_id) else hashlib.sha256(call_id.encode()).hexdigest()[:9]


def fit_tool_call_ids(messages: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """Tool call ids in the shape the template demands: 9 letters or digits for Mistral's templates.

    OpenAI-style ids (`call_...`, ours included) become a digest of 9 hex digits, the same for a
    call and its result, and the same on every turn (the prompt prefix stays cacheable).
    """
    if "tool_call" not in template or not _NINE_CHAR_IDS.search(template):
        return messages
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {**call, "id": _nine_char_id(call["id"])} if isinstance(call.get("id"), str) else call
                for call in message["tool_calls"]
            ]
        if isinstance(message.get("tool_call_id"), str):
            message["tool_call_id"] = _nine_char_id(message["tool_call_id"])
        out.append(message)
    return out


# Functionary v3.2 writes `'>>>' + name + '\n' + tool_call['function']['arguments']`: a string, never an object
_CONCATENATED_ARGUMENTS = re.compile(r"""\+\s*tool_call\[['"]function['"]\]\[['"]arguments['"]\](?!\s*\|)""")


def fit_tool_call_arguments(messages: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """Past tool-call arguments as JSON text for templates that concatenate them as strings (else objects)."""
    if not _CONCATENATED_ARGUMENTS.search(template):
        return messages
    out = []
    for message in messages:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [_arguments_as_text(call) for call in message["tool_calls"]]}
        out.append(message)
    return out


def _arguments_as_text(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or isinstance(function.get("arguments"), str):
        return call
    arguments = json.dumps(function.get("arguments", {}), ensure_ascii=False)
    return {**call, "function": {**function, "arguments": arguments}}
