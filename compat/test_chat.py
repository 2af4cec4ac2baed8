"""Chat completions as the `openai` SDK and raw HTTP clients use them."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_sdk_create(client: openai.OpenAI, chat_model: str) -> None:
    r = client.chat.completions.create(model=chat_model, messages=MESSAGES, max_tokens=8)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_sdk_max_completion_tokens(client: openai.OpenAI, chat_model: str) -> None:
    r = client.chat.completions.create(
        model=chat_model, max_completion_tokens=3, messages=[{"role": "user", "content": "Write a long poem."}]
    )
    assert r.usage and r.usage.completion_tokens <= 3 and r.choices[0].finish_reason == "length"


def test_sdk_stream_with_usage(client: openai.OpenAI, chat_model: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=chat_model, messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_sdk_async_stream(base_url: str, api_key: str, chat_model: str) -> None:
    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
        stream = await client.chat.completions.create(model=chat_model, messages=MESSAGES, max_tokens=6, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return text

    assert isinstance(asyncio.run(run()), str)


def test_sdk_stream_helper(client: openai.OpenAI, chat_model: str) -> None:
    with client.chat.completions.stream(model=chat_model, messages=MESSAGES, max_tokens=48, temperature=0) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content is not None


def test_sdk_with_raw_response(client: openai.OpenAI, chat_model: str) -> None:
    raw = client.chat.completions.with_raw_response.create(model=chat_model, messages=MESSAGES, max_tokens=2)
    assert raw.headers.get("x-request-id") and raw.parse().choices


def test_sdk_logprobs(client: openai.OpenAI, chat_model: str) -> None:
    r = client.chat.completions.create(model=chat_model, messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content if r.choices[0].logprobs else None
    assert content and all(len(e.top_logprobs) == 2 for e in content)


def test_sdk_n_and_seed(client: openai.OpenAI, chat_model: str) -> None:
    r = client.chat.completions.create(model=chat_model, messages=MESSAGES, max_tokens=4, n=2, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1]


def test_sdk_bad_request_class(client: openai.OpenAI, chat_model: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=chat_model, messages=MESSAGES, temperature=5)


def test_sdk_context_overflow_message(client: openai.OpenAI, chat_model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=chat_model, messages=MESSAGES, max_tokens=10_000_000)
    assert "context_length_exceeded" in str(info.value) or "maximum context length" in str(info.value)


def test_raw_sse_framing(base_url: str, api_key: str, chat_model: str) -> None:
    body = {"model": chat_model, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST",
        base_url + "/chat/completions",
        json=body,
        timeout=120,
        headers={"authorization": f"Bearer {api_key}", "accept": "application/json"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1].strip() == "data: [DONE]"
    for line in events[:-1]:
        assert json.loads(line[5:])["object"] == "chat.completion.chunk"


def test_raw_malformed_json_error_body(base_url: str, api_key: str) -> None:
    response = httpx.post(
        base_url + "/chat/completions",
        content=b"{nope",
        timeout=30,
        headers={"authorization": f"Bearer {api_key}", "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}


def test_raw_explicit_nulls_and_unknown_fields(base_url: str, api_key: str, chat_model: str) -> None:
    body = {
        "model": chat_model,
        "messages": MESSAGES,
        "max_tokens": 2,
        "seed": None,
        "stream": False,
        "store": False,
        "metadata": None,
        "service_tier": "auto",
        "some_future_field": {"x": 1},
    }
    response = httpx.post(
        base_url + "/chat/completions", json=body, timeout=120, headers={"authorization": f"Bearer {api_key}"}
    )
    assert response.status_code == 200, response.text


def test_sdk_legacy_completion(client: openai.OpenAI, chat_model: str) -> None:
    r = client.completions.create(model=chat_model, prompt=["Paris is", "Rome is"], max_tokens=3)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]


def test_sdk_forced_tool_call(client: openai.OpenAI, chat_model: str) -> None:
    r = client.chat.completions.create(
        model=chat_model,
        max_tokens=64,
        temperature=0,
        tools=TOOLS,
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.id and call.type == "function" and call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)


def test_sdk_tool_round_trip(client: openai.OpenAI, chat_model: str) -> None:
    messages: list = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(
        model=chat_model, max_tokens=64, temperature=0, tools=TOOLS, messages=messages, tool_choice="required"
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    final = client.chat.completions.create(model=chat_model, max_tokens=24, tools=TOOLS, messages=messages)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_sdk_streamed_tool_call_deltas(client: openai.OpenAI, chat_model: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=chat_model,
            max_tokens=64,
            temperature=0,
            tools=TOOLS,
            tool_choice="required",
            stream=True,
            messages=[{"role": "user", "content": "Weather in Rome?"}],
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and all(isinstance(d.index, int) for d in deltas) and deltas[0].id and deltas[0].function
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert "city" in json.loads(arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<tool_call>" not in text


def test_sdk_tool_choice_none_answers_in_text(client: openai.OpenAI, chat_model: str) -> None:
    r = client.chat.completions.create(
        model=chat_model,
        max_tokens=16,
        tools=TOOLS,
        tool_choice="none",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
    )
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("stop", "length")


def test_sdk_json_object(client: openai.OpenAI, chat_model: str) -> None:
    prompt = 'Reply with a JSON object with one key, "name", holding a name for a cat.'
    r = client.chat.completions.create(
        model=chat_model,
        max_tokens=120,
        response_format={"type": "json_object"},
        temperature=0,
        messages=[{"role": "user", "content": prompt}],
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


def test_sdk_json_schema(client: openai.OpenAI, chat_model: str) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 20}, "confidence": {"type": "integer"}},
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    # greedy: sampled at the default temperature, the unbounded integer can run past max_tokens
    r = client.chat.completions.create(
        model=chat_model,
        max_tokens=60,
        messages=MESSAGES,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    data = json.loads(r.choices[0].message.content or "")
    assert set(data) == {"answer", "confidence"} and isinstance(data["confidence"], int)
