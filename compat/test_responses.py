"""The Responses API (`/v1/responses`) as the `openai` SDK and raw HTTP clients use it.

Lengths stay at 16 tokens or more: OpenAI refuses a smaller `max_output_tokens`.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

QUESTION = "What is the capital of France? Answer in one word."
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    }
]
FINAL = ("response.completed", "response.incomplete")


def test_responses_create(client: openai.OpenAI, chat_model: str) -> None:
    r = client.responses.create(model=chat_model, input=QUESTION, max_output_tokens=16)
    assert r.id and r.object == "response" and r.status in ("completed", "incomplete")
    message = next(item for item in r.output if item.type == "message")
    assert message.role == "assistant" and message.content[0].type == "output_text"
    assert isinstance(r.output_text, str) and r.output_text
    assert r.usage and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens is not None


def test_responses_stream_helper(client: openai.OpenAI, chat_model: str) -> None:
    with client.responses.stream(model=chat_model, input=QUESTION, max_output_tokens=16) as stream:
        events: list[Any] = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in FINAL
    assert "response.output_item.added" in kinds and "response.output_item.done" in kinds
    assert len({e.response.id for e in events if e.type in ("response.created", *FINAL)}) == 1
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text


def test_responses_raw_sse_event_names(base_url: str, api_key: str, chat_model: str) -> None:
    body = {"model": chat_model, "input": QUESTION, "max_output_tokens": 16, "stream": True}
    with httpx.stream(
        "POST", base_url + "/responses", json=body, timeout=120, headers={"authorization": f"Bearer {api_key}"}
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line and not line.startswith(":")]
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
    payloads = [json.loads(line.split(":", 1)[1]) for line in lines if line.startswith("data:")]
    assert names == [p["type"] for p in payloads] and names[-1] in FINAL


def test_responses_previous_response_id(client: openai.OpenAI, chat_model: str) -> None:
    first = client.responses.create(model=chat_model, input="My name is Ada.", max_output_tokens=16)
    second = client.responses.create(
        model=chat_model, input="What is my name?", max_output_tokens=16, previous_response_id=first.id
    )
    assert second.previous_response_id == first.id and second.output_text
    assert first.usage and second.usage and second.usage.input_tokens > first.usage.input_tokens


def test_responses_retrieve_input_items_delete(client: openai.OpenAI, chat_model: str) -> None:
    r = client.responses.create(model=chat_model, input=QUESTION, max_output_tokens=16, metadata={"kit": "compat"})
    again = client.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == r.output_text and again.metadata == {"kit": "compat"}
    items = client.responses.input_items.list(r.id)
    assert [item.type for item in items.data] == ["message"]
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_responses_unknown_previous_response(client: openai.OpenAI, chat_model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model=chat_model, input="Hi", max_output_tokens=16, previous_response_id="resp_does_not_exist"
        )
    assert info.value.code == "previous_response_not_found"


def test_responses_tool_round_trip(client: openai.OpenAI, chat_model: str) -> None:
    first = client.responses.create(
        model=chat_model,
        input="What's the weather in Paris?",
        tools=TOOLS,
        tool_choice="required",
        max_output_tokens=64,
        temperature=0,
    )
    call: Any = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and call.call_id and "city" in json.loads(call.arguments)
    final = client.responses.create(
        model=chat_model,
        previous_response_id=first.id,
        tools=TOOLS,
        max_output_tokens=24,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
    )
    assert final.status in ("completed", "incomplete") and final.output


def test_responses_streamed_function_call(client: openai.OpenAI, chat_model: str) -> None:
    with client.responses.stream(
        model=chat_model,
        input="Weather in Rome?",
        tools=TOOLS,
        max_output_tokens=64,
        temperature=0,
        tool_choice={"type": "function", "name": "get_weather"},
    ) as stream:
        events: list[Any] = list(stream)
        assert events and events[-1].type == "response.completed", [e.type for e in events][-6:]
        final = stream.get_final_response()
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    call: Any = next(item for item in final.output if item.type == "function_call")
    assert call.arguments == arguments and "city" in json.loads(arguments)


def test_responses_json_schema(client: openai.OpenAI, chat_model: str) -> None:
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=chat_model,
        input=QUESTION,
        max_output_tokens=40,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    )
    assert set(json.loads(r.output_text)) == {"capital"}
