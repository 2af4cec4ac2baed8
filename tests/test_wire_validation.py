"""Requests OpenAI answers with a 400 are 400s here too, with messages that say what is wrong: `stream_options`
without `stream`, tool names OpenAI refuses, outputs of calls never made, seeds beyond int64, text parts without
text, and lone UTF-16 surrogates in the JSON."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server.app import create_app
from server.config import Settings
from server.registry import ModelRegistry
from tests.serving import running_server

MODEL = "smollm2-135m-instruct"
KEY = "sk-wire"
USER = [{"role": "user", "content": "Hi"}]
INT64_MAX = 2**63 - 1


def chat_tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


def flat_tool(name: str) -> dict[str, Any]:
    return {"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}}


@pytest.fixture(scope="module")
def base(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("wire"), api_keys=(KEY,))
    with running_server(create_app(settings, registry)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)


def post(base: str, path: str, body: object) -> httpx.Response:
    return httpx.post(base + "/v1" + path, json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=120)


def error_of(response: httpx.Response, param: str | None, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error  # type: ignore[no-any-return]


# -- stream_options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_without_stream_is_400(base: str, path: str, stream: bool | None) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": USER,
        "prompt": "Hi",
        "max_tokens": 1,
        "stream_options": {"include_usage": True},
    }
    if stream is not None:
        body["stream"] = stream
    error = error_of(post(base, path, body), "stream_options")
    assert error["message"] == "The 'stream_options' parameter is only allowed when 'stream' is enabled."


def test_stream_options_null_or_with_stream_is_fine(client: openai.OpenAI, base: str) -> None:
    assert (
        post(
            base, "/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 1, "stream_options": None}
        ).status_code
        == 200
    )
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=1, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=1,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    assert info.value.param == "stream_options"


# -- tool names -------------------------------------------------------------------------------------
BAD_NAMES = [
    ("", "empty_string"),
    ("get weather", "invalid_value"),
    ("wetter.heute", "invalid_value"),
    ("x" * 65, "string_above_max_length"),
    ("naïve", "invalid_value"),
]


@pytest.mark.parametrize(("name", "code"), BAD_NAMES)
def test_chat_tool_names_follow_openais_pattern(base: str, name: str, code: str) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 1, "tools": [chat_tool("ok"), chat_tool(name)]}
    error = error_of(post(base, "/chat/completions", body), "tools[1].function.name", code)
    assert error["message"].startswith("Invalid 'tools[1].function.name': ")


@pytest.mark.parametrize(("name", "code"), BAD_NAMES)
def test_responses_tool_names_follow_openais_pattern(base: str, name: str, code: str) -> None:
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 1, "tools": [flat_tool(name)]}
    error_of(post(base, "/responses", body), "tools[0].name", code)


def test_duplicate_tool_names_are_400(base: str) -> None:
    tools = [chat_tool("a"), chat_tool("b"), chat_tool("a")]
    error = error_of(
        post(base, "/chat/completions", {"model": MODEL, "messages": USER, "tools": tools}), "tools[2].function.name"
    )
    assert "unique" in error["message"] and "tools[0]" in error["message"]
    flat = [flat_tool("a"), flat_tool("a")]
    error_of(post(base, "/responses", {"model": MODEL, "input": "Hi", "tools": flat}), "tools[1].name")


def test_tool_choice_names_follow_the_pattern(base: str) -> None:
    chat = {
        "model": MODEL,
        "messages": USER,
        "tools": [chat_tool("a")],
        "tool_choice": {"type": "function", "function": {"name": "not valid!"}},
    }
    error_of(post(base, "/chat/completions", chat), "tool_choice.function.name", "invalid_value")
    flat = {
        "model": MODEL,
        "input": "Hi",
        "tools": [flat_tool("a")],
        "tool_choice": {"type": "function", "name": "a b"},
    }
    error_of(post(base, "/responses", flat), "tool_choice.name", "invalid_value")


def test_valid_tool_names_still_work(client: openai.OpenAI) -> None:
    name = "get-Weather_2" + "x" * 51  # 64 characters of every allowed kind
    r = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=1,  # type: ignore[arg-type]
        tools=[chat_tool(name)],
    )  # type: ignore[list-item]
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


# -- function_call_output ---------------------------------------------------------------------------
def call(call_id: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": '{"city": "Paris"}'}


def output(call_id: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": "sunny"}


def test_function_call_output_without_its_call_is_400(base: str) -> None:
    question = {"role": "user", "content": "Weather in Paris?"}
    error = error_of(
        post(base, "/responses", {"model": MODEL, "input": [question, output("call_nope")]}), "input[1].call_id"
    )
    assert error["message"] == "No tool call found for function call output with call_id call_nope."
    # the call after its output does not count either
    error_of(
        post(base, "/responses", {"model": MODEL, "input": [question, output("call_1"), call("call_1")]}),
        "input[1].call_id",
    )


def test_function_call_output_matches_a_call_in_the_input_or_the_chain(base: str) -> None:
    question = {"role": "user", "content": "Weather in Paris?"}
    first = post(
        base,
        "/responses",
        {"model": MODEL, "max_output_tokens": 1, "input": [question, call("call_a"), output("call_a"), call("call_b")]},
    )
    assert first.status_code == 200, first.text
    previous = first.json()["id"]
    follow_up = post(
        base,
        "/responses",
        {"model": MODEL, "max_output_tokens": 1, "previous_response_id": previous, "input": [output("call_b")]},
    )
    assert follow_up.status_code == 200, follow_up.text
    stranger = post(
        base,
        "/responses",
        {"model": MODEL, "max_output_tokens": 1, "previous_response_id": previous, "input": [output("call_c")]},
    )
    error_of(stranger, "input[0].call_id")


# -- seed -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_seed_above_int64_is_400(base: str, path: str) -> None:
    body = {"model": MODEL, "messages": USER, "prompt": "Hi", "max_tokens": 1}
    error = error_of(post(base, path, {**body, "seed": INT64_MAX + 1}), "seed", "integer_above_max_value")
    assert str(INT64_MAX) in error["message"]
    error_of(post(base, path, {**body, "seed": 10**30}), "seed")
    error_of(post(base, path, {**body, "seed": -(2**63) - 1}), "seed")
    assert post(base, path, {**body, "seed": INT64_MAX}).status_code == 200
    assert post(base, path, {**body, "seed": -(2**63)}).status_code == 200


# -- content parts ----------------------------------------------------------------------------------
def test_text_part_without_text_names_the_missing_field(base: str) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text"}]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": parts}]}
    error = error_of(post(base, "/chat/completions", chat), "messages[0].content[1].text", "missing_required_parameter")
    assert error["message"] == "Missing required parameter: 'messages[0].content[1].text'."
    responses = {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_text"}]}]}
    error_of(post(base, "/responses", responses), "input[0].content[0].text", "missing_required_parameter")
    # a part of another type is still "unsupported", as before
    image = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    error_of(post(base, "/chat/completions", image), "messages[0].content[0]", "unsupported_content_type")


# -- lone surrogates --------------------------------------------------------------------------------
def _chat_with_raw_content(base: str, text: bytes) -> httpx.Response:
    """A chat request whose message content is `text` as written, JSON escapes included."""
    body = (
        b'{"model": "'
        + MODEL.encode()
        + b'", "max_tokens": 1, "messages": [{"role": "user", "content": "'
        + text
        + b'"}]}'
    )
    return httpx.post(
        base + "/v1/chat/completions",
        content=body,
        timeout=60,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )


@pytest.mark.parametrize("text", [rb"\ud800", rb"\ud800x", rb"a\udc00", rb"\ud800\u0041", rb"\\\udbff"])
def test_lone_surrogate_is_named_not_called_truncated(base: str, text: bytes) -> None:
    response = _chat_with_raw_content(base, text)
    error = error_of(response, None, "invalid_json")
    assert "surrogate" in error["message"] and "truncated" not in error["message"]


@pytest.mark.parametrize("text", [rb"\ud83d\ude00", rb"\\ud800", rb"\\\\ud800"])
def test_surrogate_pairs_and_escaped_backslashes_still_decode(base: str, text: bytes) -> None:
    response = _chat_with_raw_content(base, text)
    assert response.status_code == 200, response.text
