"""Forced tool calls on real Qwen-family tokenizers and chat templates (tiny random weights), over HTTP.

Qwen2.5, Qwen3 and QwQ templates render `tools` themselves, in the Hermes `<tool_call>` JSON format.
All three vocabularies hold `<tool_call>` as one added token (id 151657), which the forcing grammar must
name as a token, not as text. (DeepSeek-R1-Distill-Qwen writes calls in DeepSeek's own format, with its
own added markers: tests/test_native_tool_formats.py covers it.) Random weights say nothing sensible: the grammar
alone makes their calls well-formed, so the schemas keep values bounded (small integers, enums).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.errors import APIError
from server.registry import ModelRegistry
from server.serving.tool_grammar import forcing_grammar
from server.serving.tools import tool_format
from tests.real_vocab import QWEN3_ADDED, QWEN25_ADDED, tiny_model_dir
from tests.serving import loaded_models, running_server, tiny_settings

jsonschema = pytest.importorskip("jsonschema")

MODELS = {
    "qwen2.5": dict(
        template="Qwen-Qwen2.5-7B-Instruct", model_type="qwen2", added=QWEN25_ADDED, eos_token="<|im_end|>"
    ),
    "qwen3": dict(template="Qwen-Qwen3-0.6B", model_type="qwen3", added=QWEN3_ADDED, eos_token="<|im_end|>"),
    "qwq": dict(template="Qwen-QwQ-32B", model_type="qwen2", added=QWEN25_ADDED, eos_token="<|im_end|>"),
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 9},
        "b": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["a", "b"],
}
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"]}
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Add two digits", "parameters": ADD}},
    {"type": "function", "function": {"name": "paint", "description": "Pick a colour", "parameters": COLOR}},
]
SCHEMAS = {"add": ADD, "paint": COLOR}
USER = [{"role": "user", "content": "Add 2 and 3."}]
# a pydantic `set[str]` field: uniqueItems, which the grammar cannot enforce
TAGS = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2, "uniqueItems": True}},
    "required": ["tags"],
}
GRAMMAR_SOURCE = ("%json", "start:", "<[", "<state>", "x-guidance")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qwen-tools")


@pytest.fixture(scope="module")
def registry(root: Path) -> Iterator[ModelRegistry]:
    dirs = {name: tiny_model_dir(root / name, vocab="qwen2", **spec) for name, spec in MODELS.items()}
    with loaded_models(dirs, tiny_settings(root, 0.05)) as registry:
        yield registry


@pytest.fixture(scope="module")
def base(root: Path, registry: ModelRegistry) -> Iterator[str]:
    with running_server(create_app(tiny_settings(root, 0.05), registry)) as url:
        yield url


def post(base: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(base + "/v1" + path, json=body, timeout=120)


def sse(response: httpx.Response) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in response.text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert not any(marker in error["message"] for marker in GRAMMAR_SOURCE), error["message"]
    return error  # type: ignore[no-any-return]


def check_call(call: dict[str, Any], name: str | None = None) -> None:
    function = call["function"]
    assert name is None or function["name"] == name
    jsonschema.validate(json.loads(function["arguments"]), SCHEMAS[function["name"]])


@pytest.mark.parametrize("model", list(MODELS))
def test_required_and_named_tool_choice_give_a_parsed_call(base: str, model: str) -> None:
    for choice, name in (("required", None), ({"type": "function", "function": {"name": "paint"}}, "paint")):
        r = post(
            base,
            "/chat/completions",
            {
                "model": model,
                "messages": USER,
                "tools": TOOLS,
                "tool_choice": choice,
                "max_tokens": 40,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        choice0 = r.json()["choices"][0]
        assert choice0["finish_reason"] == "tool_calls", choice0
        assert not choice0["message"]["content"], choice0
        (call,) = choice0["message"]["tool_calls"]
        check_call(call, name)


@pytest.mark.parametrize("model", list(MODELS))
def test_streamed_forced_call_shows_no_markup(base: str, model: str) -> None:
    r = post(
        base,
        "/chat/completions",
        {
            "model": model,
            "messages": USER,
            "tools": TOOLS,
            "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "add"}},
            "max_tokens": 40,
            "temperature": 1,
            "seed": 3,
        },
    )
    chunks = sse(r)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "<tool" not in content and "{" not in content, content
    deltas = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []]
    arguments = "".join(d["function"].get("arguments") or "" for d in deltas)
    check_call({"function": {"name": deltas[0]["function"]["name"], "arguments": arguments}}, "add")
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("model", ["qwen3", "qwen2.5"])
def test_forced_call_cut_by_max_tokens_leaks_no_markup(base: str, model: str) -> None:
    """finish_reason "length", no tool_calls, no content: the partial call is dropped everywhere."""
    body = {
        "model": model,
        "messages": USER,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 5,
        "temperature": 0,
    }
    whole = post(base, "/chat/completions", body).json()["choices"][0]
    assert whole["finish_reason"] == "length" and not whole["message"]["content"], whole
    assert not whole["message"].get("tool_calls")
    chunks = sse(post(base, "/chat/completions", {**body, "stream": True}))
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == "" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    responses = {
        "model": model,
        "input": "Add 2 and 3.",
        "tool_choice": "required",
        "max_output_tokens": 5,
        "temperature": 0,
        "store": False,
        "tools": [
            {"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
            for t in TOOLS
        ],
    }
    response = post(base, "/responses", responses).json()
    assert response["status"] == "incomplete", response
    texts = [part["text"] for item in response["output"] if item["type"] == "message" for part in item["content"]]
    assert all("<tool" not in t and "{" not in t for t in texts), texts
    assert not [item for item in response["output"] if item["type"] == "function_call"]
    events = sse(post(base, "/responses", {**responses, "stream": True}))
    shown = [e.get("delta") or e.get("text") or "" for e in events if e["type"].startswith("response.output_text")]
    assert all("<tool" not in t and "{" not in t for t in shown), shown
    assert events[-1]["type"] == "response.incomplete"
    assert not [e for e in events if e["type"].startswith("response.function_call")]


@pytest.mark.parametrize("model", ["qwen2.5", "qwen3"])
def test_non_strict_unenforceable_keyword_is_ignored_strict_is_a_400(base: str, model: str) -> None:
    tool = {"type": "function", "function": {"name": "tag", "parameters": TAGS}}
    body = {
        "model": model,
        "messages": USER,
        "tools": [tool],
        "tool_choice": "required",
        "max_tokens": 40,
        "temperature": 0,
    }
    r = post(base, "/chat/completions", body)
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert isinstance(json.loads(call["function"]["arguments"])["tags"], list)
    strict = {**tool, "function": {**tool["function"], "strict": True}}
    error = assert_openai_error(post(base, "/chat/completions", {**body, "tools": [strict]}), 400)
    assert "uniqueItems" in error["message"] and error["param"] == "tools[0].function.parameters"


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "object", "properties": {"a": {"type": "no-such-type"}}},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}},
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["a"]},
    ],
)
def test_bad_tool_schemas_are_a_400_naming_the_tool(base: str, parameters: dict[str, Any]) -> None:
    tool = {"type": "function", "function": {"name": "broken", "parameters": parameters, "strict": True}}
    for model in ("qwen3", "qwen2.5"):
        r = post(
            base,
            "/chat/completions",
            {"model": model, "messages": USER, "tools": [tool], "tool_choice": "required", "max_tokens": 8},
        )
        error = assert_openai_error(r, 400)
        assert error["param"] == "tools[0].function.parameters" and "broken" in error["message"]


def test_pydantic_defs_resolve_inside_a_forced_call(base: str) -> None:
    """A pydantic model's `$defs` and `#/$defs/...` refs work once nested under "arguments"."""
    parameters = {
        "$defs": {"Digit": {"type": "integer", "minimum": 0, "maximum": 9}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/Digit"}},
        "required": ["a"],
    }
    tool = {"type": "function", "function": {"name": "digit", "parameters": parameters}}
    r = post(
        base,
        "/chat/completions",
        {
            "model": "qwen3",
            "messages": USER,
            "tools": [tool],
            "tool_choice": "required",
            "max_tokens": 30,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)


@pytest.mark.parametrize("model", list(MODELS))
def test_the_markers_are_the_added_tokens_of_every_qwen_vocabulary(registry: ModelRegistry, model: str) -> None:
    served = registry.get(model)
    fmt = tool_format(served.tokenizer)
    assert fmt.json_calls and fmt.native
    spec = forcing_grammar(TOOLS, None, fmt, served.tokenizer, served.engine.constraints)
    assert spec.text is not None and spec.text.startswith("start: <[151657]> NL? call NL? <[151658]>")


@pytest.mark.parametrize("model", list(MODELS))
def test_a_model_knows_its_tokenizer_before_its_first_request(registry: ModelRegistry, model: str) -> None:
    """The per-tokenizer findings (control tokens, think markers over the 151k vocabulary) are made while the
    model starts, not by the first burst's requests, each in its own worker thread at once."""
    from server.serving.prompt import control_tokens
    from server.serving.reasoning import model_markers

    tokenizer = registry.get(model).tokenizer
    for cached in (control_tokens, model_markers):
        misses = cached.cache_info().misses
        cached(tokenizer)
        assert cached.cache_info().misses == misses, f"{cached.__name__} was not worked out at start-up"


class _BrokenMarkers:
    """A tokenizer lookup that names a token the vocabulary does not have: the grammar cannot compile."""

    def get_added_vocab(self) -> dict[str, int]:
        return {"<tool_call>": 10**9}


def test_a_grammar_of_ours_that_fails_is_a_logged_500(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    served = registry.get("qwen3")
    with caplog.at_level("ERROR", logger="server.serving.tool_grammar"), pytest.raises(APIError) as info:
        forcing_grammar(TOOLS, "add", tool_format(served.tokenizer), _BrokenMarkers(), served.engine.constraints)
    error = info.value
    assert error.status == 500 and error.body()["error"]["type"] == "server_error"
    assert not any(marker in error.message for marker in GRAMMAR_SOURCE)
    assert "forcing grammar did not compile" in caplog.text
