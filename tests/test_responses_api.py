"""`/v1/responses` through the `openai` SDK and raw HTTP against the real default model.

Covers the response object and its stream (as `client.responses.stream()` reads it), chains through
`previous_response_id` that prefill only the new input, tool round trips, structured output,
storage per tenant, and a chain whose KV was evicted by other conversations.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest

from server.app import create_app
from server.config import Settings
from server.engine.engine import Engine, EngineConfig
from server.registry import ModelRegistry, ServedModel
from tests.serving import running_server

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer in one word."
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


@pytest.fixture(scope="module")
def base(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory, database_url: str | None) -> Iterator[str]:
    settings = replace(
        Settings(),
        api_keys=("sk-a", "sk-b"),
        data_dir=tmp_path_factory.mktemp("responses-data"),
        database_url=database_url,
    )
    with running_server(create_app(settings, registry)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="sk-a", max_retries=0)


def raw(base: str, method: str, path: str, body: object = None, key: str = "sk-a") -> httpx.Response:
    return httpx.request(
        method, base + "/v1" + path, json=body, headers={"authorization": f"Bearer {key}"}, timeout=120
    )


def test_create_shape(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0, metadata={"case": "shape"}
    )
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.created_at > 0 and r.metadata == {"case": "shape"}
    message = r.output[0]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert "Paris" in r.output_text
    usage = r.usage
    assert usage and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0 and usage.output_tokens_details.reasoning_tokens == 0
    assert r.text and r.text.format and r.text.format.type == "text" and r.tool_choice == "auto"


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL, input="Tell me a long story about a dragon.", max_output_tokens=4, temperature=0
    )
    assert r.status == "incomplete" and r.incomplete_details and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage and r.usage.output_tokens == 4 and r.output[0].status == "incomplete"  # type: ignore[union-attr]


def test_stream_helper_event_sequence(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0, store=False)
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0) as stream:
        events: list[Any] = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == whole.output_text
    assert client.responses.retrieve(final.id).output_text == text  # stored before response.completed


def test_raw_sse_names_each_event(base: str) -> None:
    with httpx.stream(
        "POST",
        base + "/v1/responses",
        timeout=60,
        headers={"authorization": "Bearer sk-a"},
        json={"model": MODEL, "input": "Hi", "max_output_tokens": 3, "stream": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line and not line.startswith(":")]
    names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert names == [p["type"] for p in payloads] and names[-1] == "response.incomplete"
    assert payloads[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_five_turn_chain_prefills_only_new_input(client: openai.OpenAI, base: str) -> None:
    questions = [
        "My name is Ada and I like tea. Please remember it.",
        "What is the capital of France?",
        "And of Italy?",
        "And of Spain?",
        "What is my name?",
    ]
    # this module runs once per database on one engine: a run's own instructions keep the other run's KV out
    instructions = f"Answer briefly. Session {base.rsplit(':', 1)[-1]}."
    turns = []
    previous = None
    for question in questions:
        r = client.responses.create(
            model=MODEL,
            input=question,
            previous_response_id=previous,
            temperature=0,
            max_output_tokens=8,
            instructions=instructions,
        )
        turns.append(r)
        previous = r.id
    cached = [t.usage.input_tokens_details.cached_tokens for t in turns]  # type: ignore[union-attr]
    for before, after in zip(turns, turns[1:]):
        assert before.usage and after.usage and after.previous_response_id == before.id
        # everything the previous turn computed (its input and all but its last output token) is reused
        computed = before.usage.input_tokens + before.usage.output_tokens - 1
        assert after.usage.input_tokens_details.cached_tokens == computed
    print("5-turn chain:", [(t.usage.input_tokens, c) for t, c in zip(turns, cached)])  # type: ignore[union-attr]
    # the chained answer is the answer to the whole history sent at once (greedy, recomputed elsewhere)
    history: list[Any] = []
    for question, turn in zip(questions, turns[:-1]):
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": turn.output_text}]
    history.append({"role": "user", "content": questions[-1]})
    flat = client.responses.create(
        model=MODEL, input=history, temperature=0, max_output_tokens=8, store=False, instructions=instructions
    )
    assert flat.output_text == turns[-1].output_text
    assert flat.usage and flat.usage.input_tokens == turns[-1].usage.input_tokens  # type: ignore[union-attr]
    # each stored response lists its own input
    items = client.responses.input_items.list(turns[2].id)
    assert [i.content[0].text for i in items.data] == [questions[2]]  # type: ignore[union-attr]


def test_tool_round_trip_with_function_call_output(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL,
        input="What's the weather in Paris?",
        tools=TOOLS,
        tool_choice="required",
        temperature=0,  # a sampled call may run past its token budget and end incomplete (a flake, once in ~50)
        max_output_tokens=64,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and len(calls) == 1
    call: Any = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert "city" in json.loads(call.arguments)
    final = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        tools=TOOLS,
        max_output_tokens=12,
        temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
    )
    assert final.status in ("completed", "incomplete") and final.output
    assert final.usage and first.usage and final.usage.input_tokens_details.cached_tokens > first.usage.input_tokens
    # the same exchange without server state: the call and its output sent back as input items
    stateless = client.responses.create(
        model=MODEL,
        tools=TOOLS,
        max_output_tokens=4,
        store=False,
        input=[
            {"role": "user", "content": "What's the weather in Paris?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
        ],
    )
    assert stateless.output


def test_streamed_forced_call_has_argument_deltas(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL,
        input="Weather in Rome?",
        tools=TOOLS,
        max_output_tokens=40,
        temperature=0,
        tool_choice={"type": "function", "name": "get_weather"},
    ) as stream:
        events: list[Any] = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.output_text.delta" not in kinds
    assert kinds[-1] == "response.completed"
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert final.output[0].type == "function_call" and final.output[0].arguments == arguments
    assert "city" in json.loads(arguments)


def test_text_format_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 12}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=MODEL,
        input=QUESTION,
        max_output_tokens=30,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    )
    assert r.status == "completed" and set(json.loads(r.output_text)) == {"capital"}
    assert r.text and r.text.format and r.text.format.type == "json_schema"


def test_storage_is_per_tenant(client: openai.OpenAI, base: str) -> None:
    r = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": "Hi"}, {"role": "user", "content": [{"type": "input_text", "text": "!"}]}],
        max_output_tokens=2,
    )
    assert raw(base, "GET", f"/responses/{r.id}").json()["id"] == r.id
    for method, path in (
        ("GET", f"/responses/{r.id}"),
        ("GET", f"/responses/{r.id}/input_items"),
        ("DELETE", f"/responses/{r.id}"),
    ):
        other = raw(base, method, path, key="sk-b")
        assert other.status_code == 404 and other.json()["error"]["type"] == "invalid_request_error"
    other = raw(base, "POST", "/responses", {"model": MODEL, "input": "x", "previous_response_id": r.id}, key="sk-b")
    assert other.status_code == 400 and other.json()["error"]["code"] == "previous_response_not_found"
    page = client.responses.input_items.list(r.id, limit=1, order="asc")
    assert page.has_more and page.data[0].content[0].text == "Hi"  # type: ignore[union-attr]
    rest = client.responses.input_items.list(r.id, limit=5, order="asc", after=page.data[0].id)
    assert not rest.has_more and [i.content[0].text for i in rest.data] == ["!"]  # type: ignore[union-attr]
    assert [i.id for i in client.responses.input_items.list(r.id).data] == [rest.data[0].id, page.data[0].id]
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_store_false_cannot_be_retrieved_or_continued(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="Again", previous_response_id=r.id)
    assert info.value.code == "previous_response_not_found" and info.value.param == "previous_response_id"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input"),  # reasoning items alone are no conversation
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "hi", "tools": TOOLS, "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"input": "hi", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"input": "hi", "temperature": 7}, "temperature"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "max_output_tokens": 9000}, "input"),
        ({"input": "hi", "background": True}, "background"),
        ({"input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"input": "hi", "previous_response_id": "resp_missing"}, "previous_response_id"),
    ],
)
def test_bad_requests_are_400_naming_the_param(base: str, body: dict, param: str) -> None:
    response = raw(base, "POST", "/responses", {"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and response.json()["error"]["type"] == "invalid_request_error"


def test_input_items_paging_errors(base: str) -> None:
    assert raw(base, "GET", "/responses/resp_nope/input_items").status_code == 404
    assert raw(base, "GET", "/responses/resp_nope/input_items?limit=0").json()["error"]["param"] == "limit"
    assert raw(base, "DELETE", "/responses/resp_nope").status_code == 404


def test_evicted_chain_recomputes_the_same_answer(
    registry: ModelRegistry, client: openai.OpenAI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Other conversations press a small pool until the chain's pin and blocks are gone: the follow-up
    reuses less, and still answers exactly what the whole history sent at once gets elsewhere."""
    served = registry.get(MODEL)
    small = Engine(served.model, served.tokenizer, EngineConfig(block_size=16, num_blocks=12))
    small.start()
    try:
        only = ModelRegistry()
        only.add(
            ServedModel(
                id=MODEL, kind="chat", path=served.path, model=served.model, tokenizer=served.tokenizer, engine=small
            )
        )
        only.mark_ready()
        settings = replace(Settings(), data_dir=tmp_path_factory.mktemp("pressed-data"))
        with running_server(create_app(settings, only)) as url:
            pressed = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            first = pressed.responses.create(model=MODEL, input=QUESTION, max_output_tokens=8, temperature=0)
            key = f"public\x00{MODEL}\x00{first.id}"
            assert key in small.kv.conversations
            for i in range(3):
                filler = f"Conversation {i}: " + "a long unrelated text about rivers and mountains " * 9
                pressed.responses.create(model=MODEL, input=filler, max_output_tokens=1, prompt_cache_key=f"other-{i}")
            assert key not in small.kv.conversations
            second = pressed.responses.create(
                model=MODEL, input="And of Italy?", previous_response_id=first.id, max_output_tokens=8, temperature=0
            )
        small.check_integrity()
    finally:
        small.shutdown()
    assert first.usage and second.usage
    assert second.usage.input_tokens_details.cached_tokens < first.usage.input_tokens
    print("evicted chain: cached", second.usage.input_tokens_details.cached_tokens, "of", second.usage.input_tokens)
    reference = client.responses.create(
        model=MODEL,
        max_output_tokens=8,
        temperature=0,
        store=False,
        input=[
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And of Italy?"},
        ],
    )
    assert second.output_text == reference.output_text
    assert second.usage.input_tokens == reference.usage.input_tokens  # type: ignore[union-attr]


# -- X-Conversation-Id: the conversation key as a header (what a proxy in front of replicas routes on) ------
def test_x_conversation_id_is_echoed_on_every_response(base: str) -> None:
    body = {"model": MODEL, "input": "Say hi.", "max_output_tokens": 2}
    headers = {"Authorization": "Bearer sk-a", "X-Conversation-Id": "conv-echo-1"}
    ok = httpx.post(base + "/v1/responses", json=body, headers=headers, timeout=120)
    assert ok.status_code == 200 and ok.headers["x-conversation-id"] == "conv-echo-1"
    bad = httpx.post(base + "/v1/responses", json={**body, "max_output_tokens": -1}, headers=headers, timeout=60)
    assert bad.status_code == 400 and bad.headers["x-conversation-id"] == "conv-echo-1"
    unauthorized = httpx.get(base + "/v1/models", headers={"X-Conversation-Id": "conv-echo-1"}, timeout=10)
    assert unauthorized.status_code == 401 and unauthorized.headers["x-conversation-id"] == "conv-echo-1"


@pytest.mark.parametrize("value", ["has space", "x" * 257, "naïve"])
def test_a_malformed_x_conversation_id_is_a_400(base: str, value: str) -> None:
    got = httpx.get(
        base + "/v1/models",
        headers=[(b"authorization", b"Bearer sk-a"), (b"x-conversation-id", value.encode())],
        timeout=10,
    )
    assert got.status_code == 400
    assert got.json()["error"]["code"] == "invalid_conversation_id"
    assert "x-conversation-id" not in got.headers


def test_a_stored_chain_names_its_conversation_for_the_next_turn(client: openai.OpenAI, base: str) -> None:
    """Without the header, a stored response's answer carries its chain's key; a follow-up sent with it (as a
    client behind a proxy would) continues on the same key."""
    first = raw(base, "POST", "/responses", {"model": MODEL, "input": "Name a colour.", "max_output_tokens": 2})
    assert first.status_code == 200
    key = first.headers["x-conversation-id"]
    assert key == first.json()["id"]
    follow = httpx.post(
        base + "/v1/responses",
        json={"model": MODEL, "input": "Another.", "max_output_tokens": 2, "previous_response_id": key},
        headers={"Authorization": "Bearer sk-a", "X-Conversation-Id": key},
        timeout=120,
    )
    assert follow.status_code == 200 and follow.headers["x-conversation-id"] == key
    assert follow.json()["usage"]["input_tokens_details"]["cached_tokens"] > 0


def test_a_conversation_key_with_nul_is_stored(client: openai.OpenAI) -> None:
    """A NUL in prompt_cache_key (JSON's \\u0000) is data: the response is stored and continued (PostgreSQL's
    text cannot hold NUL; the key is mapped, not refused)."""
    first = client.responses.create(model=MODEL, input="Hi.", max_output_tokens=2, prompt_cache_key="a\x00b")
    again = client.responses.create(
        model=MODEL, input="Again.", max_output_tokens=2, previous_response_id=first.id, prompt_cache_key="a\x00b"
    )
    assert again.previous_response_id == first.id
