"""Native tool formats: a model whose template has its own tool-call format (Qwen, Llama 3.x, Mistral,
DeepSeek, GLM, Kimi, MiniMax, ...) gets `tool_choice` "required" and named calls back as `tool_calls`,
streamed with one stable index and id per call, and takes the call and its result back in the next turn.

Runs against the model named by COMPAT_TOOL_MODEL (`python -m compat --tool-model ID`); skipped
with a reason when none is given, since a model without a native tool format says nothing here.
"""

from __future__ import annotations

import json
import os

import openai
import pytest

ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 9},
        "b": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["a", "b"],
}
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Add two digits", "parameters": ADD}},
    {
        "type": "function",
        "function": {
            "name": "paint",
            "description": "Pick a colour",
            "parameters": {
                "type": "object",
                "properties": {"color": {"enum": ["red", "green"]}},
                "required": ["color"],
            },
        },
    },
]
USER = [{"role": "user", "content": "Add 2 and 3 with the add tool."}]


@pytest.fixture(scope="session")
def tool_model() -> str:
    chosen = os.environ.get("COMPAT_TOOL_MODEL")
    if not chosen:
        pytest.skip("no tool-capable model: set COMPAT_TOOL_MODEL to a model with a native tool-call format")
    return chosen


def _call(client: openai.OpenAI, model: str, choice: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0
    )  # type: ignore[call-overload, no-any-return]


def test_native_required_tool_call(client: openai.OpenAI, tool_model: str) -> None:
    choice = _call(client, tool_model, "required").choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name in ("add", "paint") and isinstance(json.loads(call.function.arguments), dict)


def test_native_named_tool_call(client: openai.OpenAI, tool_model: str) -> None:
    choice = _call(client, tool_model, {"type": "function", "function": {"name": "paint"}}).choices[0]
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "paint" and json.loads(call.function.arguments)["color"] in ("red", "green")


def test_native_streamed_tool_call_keeps_index_and_id(client: openai.OpenAI, tool_model: str) -> None:
    stream = client.chat.completions.create(
        model=tool_model, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0, stream=True
    )  # type: ignore[call-overload]
    ids, indexes, arguments, finish = set(), set(), "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            indexes.add(tc.index)
            if tc.id:
                ids.add(tc.id)
            if tc.index == 0 and tc.function and tc.function.arguments:
                arguments += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and 0 in indexes and len(ids) == len(indexes)
    assert isinstance(json.loads(arguments), dict)


def test_native_tool_result_round_trip(client: openai.OpenAI, tool_model: str) -> None:
    call = _call(client, tool_model, "required").choices[0].message.tool_calls[0]  # type: ignore[index]
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    reply = client.chat.completions.create(model=tool_model, messages=messages, tools=TOOLS, max_tokens=8)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
