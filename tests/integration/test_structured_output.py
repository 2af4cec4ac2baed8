"""Structured output (response_format json_object / json_schema) on the real default model (SmolLM2-135M).

Every case runs greedy and at temperature 1 with a seed, all requests at once (one decode batch), and
must finish with "stop" and output that parses and validates against the schema.
"""

from __future__ import annotations

import json
import queue
from typing import Any

import pytest

from server.engine.constraints import GrammarSpec
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, TokenEvent
from server.engine.request_stream import raise_if_failed
from server.engine.sampling import SamplingParams
from server.errors import InvalidRequestError
from server.registry import ModelRegistry

jsonschema = pytest.importorskip("jsonschema")

MAX_TOKENS = 80

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "hobbies": {"type": "array", "items": {"type": "string", "pattern": "^[a-z ]{1,10}$"}, "maxItems": 2},
    },
    "required": ["name", "age", "color", "hobbies"],
    "additionalProperties": False,
}

# What LangChain's `with_structured_output(Person, method="json_schema", strict=True)` sends (through the openai
# SDK's strict pydantic conversion), with the free-form strings bounded to keep generations short.
LANGCHAIN_PERSON = {
    "$defs": {
        "Address": {
            "description": "An address.",
            "properties": {
                "city": {"description": "City name", "maxLength": 16, "title": "City", "type": "string"},
                "country": {"enum": ["FR", "DE", "US"], "title": "Country", "type": "string"},
            },
            "required": ["city", "country"],
            "title": "Address",
            "type": "object",
            "additionalProperties": False,
        },
    },
    "description": "A person.",
    "properties": {
        "name": {"maxLength": 16, "title": "Name", "type": "string"},
        "age": {"maximum": 120, "minimum": 0, "title": "Age", "type": "integer"},
        "address": {"$ref": "#/$defs/Address"},
        "nickname": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}], "title": "Nickname"},
    },
    "required": ["name", "age", "address", "nickname"],
    "title": "Person",
    "type": "object",
    "additionalProperties": False,
}

CASES = {
    "json_object": (
        {"type": "json_object"},
        {"type": "object"},
        "Reply with a JSON object with keys city and country for Paris.",
    ),
    "person": (
        {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        PERSON,
        "Invent a person: name, age, favourite colour and hobbies. Answer in JSON.",
    ),
    "langchain": (
        {"type": "json_schema", "json_schema": {"name": "Person", "schema": LANGCHAIN_PERSON, "strict": True}},
        LANGCHAIN_PERSON,
        "Extract the person: Marie Curie, 66, lived in Paris, France, nicknamed Madame.",
    ),
}


@pytest.fixture(scope="module")
def served(registry: ModelRegistry) -> tuple[Engine, Any]:
    model = registry.get("smollm2-135m-instruct")
    return model.engine, model.tokenizer


def chat(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))


def run_all(engine: Engine, requests: list[GenerationRequest], timeout: float = 600.0) -> dict[str, list[TokenEvent]]:
    """Submit every request at once (they decode as one batch) and collect their events."""
    events: queue.Queue[TokenEvent] = queue.Queue()
    for request in requests:
        engine.submit(request, lambda batch: [events.put(e) for e in batch])
    out: dict[str, list[TokenEvent]] = {r.request_id: [] for r in requests}
    remaining = sum(r.params.n for r in requests)
    while remaining:
        event = events.get(timeout=timeout)
        raise_if_failed(event)
        out[event.request_id].append(event)
        remaining -= event.finish_reason is not None
    return out


def test_json_object_and_schemas_always_parse_and_validate(served: tuple[Engine, Any]) -> None:
    engine, tokenizer = served
    requests = []
    for name, (response_format, _, prompt) in CASES.items():
        grammar = GrammarSpec.from_response_format(response_format)
        for temperature in (0.0, 1.0):
            params = SamplingParams(
                max_tokens=MAX_TOKENS,
                temperature=temperature,
                seed=7,
                grammar=grammar,
                n=1 if temperature == 0.0 else 2,
            )
            requests.append(GenerationRequest(f"so-{name}-{temperature}", chat(tokenizer, prompt), params))
    results = run_all(engine, requests)
    for request in requests:
        schema = CASES[request.request_id.split("-")[1]][1]
        for index in range(request.params.n):
            seq = [e for e in results[request.request_id] if e.index == index]
            text = "".join(e.text for e in seq)
            assert seq[-1].finish_reason == "stop", (request.request_id, text)
            document = json.loads(text)
            jsonschema.validate(document, schema)
            assert isinstance(document, dict)


def test_greedy_structured_output_is_deterministic(served: tuple[Engine, Any]) -> None:
    engine, tokenizer = served
    response_format, schema, prompt = CASES["person"]
    grammar = GrammarSpec.from_response_format(response_format)
    texts = []
    for attempt in range(2):
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, grammar=grammar)
        events = engine.generate(GenerationRequest(f"so-det-{attempt}", chat(tokenizer, prompt), params))
        assert events[-1].finish_reason == "stop"
        texts.append("".join(e.text for e in events))
    assert texts[0] == texts[1]
    jsonschema.validate(json.loads(texts[0]), schema)


def test_unconstrained_rows_in_the_same_batch_are_unaffected(served: tuple[Engine, Any]) -> None:
    engine, tokenizer = served
    prompt = chat(tokenizer, "What is the capital of France?")
    plain = SamplingParams(max_tokens=12, temperature=0.0)
    alone = engine.generate(GenerationRequest("so-plain-alone", prompt, plain))
    grammar = GrammarSpec.from_response_format({"type": "json_object"})
    mixed = run_all(
        engine,
        [
            GenerationRequest("so-plain-mixed", prompt, plain),
            GenerationRequest("so-json-mixed", prompt, SamplingParams(max_tokens=40, temperature=0.0, grammar=grammar)),
        ],
    )
    assert [e.token_id for e in mixed["so-plain-mixed"]] == [e.token_id for e in alone]
    assert "".join(e.text for e in mixed["so-json-mixed"]).startswith("{")


def test_unsupported_schema_is_a_400_on_response_format(served: tuple[Engine, Any]) -> None:
    engine, tokenizer = served
    grammar = GrammarSpec.json_schema({"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}})
    request = GenerationRequest("so-bad", chat(tokenizer, "hi"), SamplingParams(max_tokens=8, grammar=grammar))
    with pytest.raises(InvalidRequestError, match="uniqueItems") as info:
        engine.generate(request)
    assert info.value.param == "response_format"


def test_forced_tool_calls_are_compact_json(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory) -> None:
    """What LangChain's `with_structured_output(Sum, method="function_calling")` sends: a pydantic schema and a
    named tool_choice. The forcing grammar allows no whitespace inside the call's JSON: SmolLM2 used to
    pretty-print `{"a": 2, "b": 3}` over lines and indentation (36 tokens); compact, the call takes 26."""
    import httpx

    from server.app import create_app
    from server.config import Settings
    from tests.serving import running_server

    parameters = {
        "properties": {"a": {"title": "A", "type": "integer"}, "b": {"title": "B", "type": "integer"}},
        "required": ["a", "b"],
        "title": "Sum",
        "type": "object",
    }
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
        "tools": [
            {
                "type": "function",
                "function": {"name": "Sum", "description": "Add two integers.", "parameters": parameters},
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "Sum"}},
        "max_tokens": 30,
        "temperature": 0,
    }
    settings = Settings(data_dir=tmp_path_factory.mktemp("compact-data"))
    with running_server(create_app(settings, registry)) as url:
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=600).json()
    choice = answer["choices"][0]
    print("forced call:", answer["usage"]["completion_tokens"], "tokens,", choice["message"])
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)
    assert answer["usage"]["completion_tokens"] <= 28
