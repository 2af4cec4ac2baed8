"""gpt-oss end to end: harmony output split into reasoning, answer and tool calls, forced calls in harmony,
`reasoning_effort` in the prompt, and calls with their results rendered back through the real template.

The model is tests/harmony_models.py's tiny random-weight `gpt_oss` (harmony special tokens on a byte-level
BPE vocabulary, the real `openai-gpt-oss-120b.jinja`). The parser is checked on token streams of that
tokenizer decoded by the engine's own detokenizer; the rest runs through the real app over HTTP, steered
by grammars (forced calls, response_format) and logit_bias where a test needs a particular output.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.config import ModelSpec, Settings
from server.engine.detokenizer import IdsToText, IncrementalDetokenizer
from server.engine.sampling import SamplingParams
from server.model_lifecycle import build_registry
from server.registry import ModelRegistry
from server.serving import tool_grammar
from server.serving.chat import prepare
from server.serving.harmony import HarmonyParser, is_harmony, special_texts
from server.serving.model_output import OutputDelta
from server.serving.scope import RequestScope
from server.wire.chat import ChatCompletionRequest
from tests.harmony_models import harmony_model_dir
from tests.serving import running_server

MODEL = "gpt-oss-tiny"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
    },
}
ANSWER = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string", "maxLength": 10}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "Weather in Paris?"}]


class _PinnedDate(datetime.datetime):
    """The day these tests were calibrated on: gpt-oss's template prints the current date into every prompt,
    and the tiny random model's greedy choices (analysis first or not) depend on every prompt token."""

    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> _PinnedDate:
        return cls(2026, 12, 6, 12, 0, 0, tzinfo=tz)


@pytest.fixture(scope="module", autouse=True)
def pinned_date() -> Iterator[None]:
    """`strftime_now` in chat templates (transformers' chat_template_utils) reads this module's `datetime`."""
    from transformers.utils import chat_template_utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chat_template_utils, "datetime", _PinnedDate)
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return harmony_model_dir(tmp_path_factory.mktemp("gpt-oss") / "tiny")
    except (RuntimeError, FileNotFoundError) as exc:  # no network and no cached llama-cpp-python sdist
        pytest.skip(f"llama.cpp's test vocabularies and templates cannot be fetched: {exc}")


@pytest.fixture(scope="module")
def registry(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    settings = Settings(
        models=(ModelSpec(MODEL, str(model_dir)),),
        default_models=False,
        kv_cache_gb=0.05,
        cache_dir=tmp_path_factory.mktemp("cache"),
    )
    reg = ModelRegistry()
    build_registry(reg, settings)
    assert reg.ready, reg.failure
    return reg


@pytest.fixture(scope="module")
def tokenizer(registry: ModelRegistry) -> Any:
    """The served model's tokenizer (EOS ids from its generation_config, as mlx-lm loads them)."""
    return registry.get(MODEL).tokenizer


@pytest.fixture(scope="module")
def base(registry: ModelRegistry) -> Iterator[str]:
    with running_server(create_app(Settings(default_models=False, models=(ModelSpec(MODEL, "x"),)), registry)) as url:
        yield url


def stream_through(tokenizer: Any, text: str, parser: HarmonyParser, cut: bool = False) -> OutputDelta:
    """`text` as the model's tokens, decoded one at a time by the engine's detokenizer and fed to the parser."""
    detok = IncrementalDetokenizer(IdsToText(tokenizer), skip_special_tokens=False)
    out = OutputDelta()
    pieces = [detok.add(i) for i in tokenizer.encode(text, add_special_tokens=False)] + [detok.flush()]
    for delta in [*(parser.feed(p) for p in pieces), parser.finish(cut=cut)]:
        out.reasoning += delta.reasoning
        out.content += delta.content
        out.calls += delta.calls
    return out


def parser(tokenizer: Any, offered: bool = True, max_calls: int | None = None) -> HarmonyParser:
    return HarmonyParser(offered, max_calls, special_texts(tokenizer))


# -- the parser on real token streams ------------------------------------------------------------------


def test_the_tiny_model_speaks_harmony(tokenizer: Any) -> None:
    assert is_harmony(tokenizer)
    assert {"<|channel|>", "<|reserved_200000|>"} <= special_texts(tokenizer)
    assert sorted(tokenizer.eos_token_ids) == [
        tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|return|>", "<|call|>")
    ]


def test_analysis_is_reasoning_and_final_is_content(tokenizer: Any) -> None:
    text = (
        "<|channel|>analysis<|message|>User asks <b>weather</b>. Answer.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris."
    )
    out = stream_through(tokenizer, text, parser(tokenizer))
    assert out.reasoning == "User asks <b>weather</b>. Answer."
    assert out.content == "It is sunny in Paris."
    assert out.calls == []


@pytest.mark.parametrize(
    "header",
    [
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",  # gpt-oss's own order
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>",  # the template's
    ],
)
def test_commentary_calls_become_tool_calls(tokenizer: Any, header: str) -> None:
    text = "<|channel|>analysis<|message|>Need the tool.<|end|>" + header + '{"city": "Paris", "days": 2}'
    out = stream_through(tokenizer, text, parser(tokenizer))
    assert out.reasoning == "Need the tool." and out.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("get_weather", {"city": "Paris", "days": 2})]


def test_token_by_token_equals_all_at_once(tokenizer: Any) -> None:
    text = "<|channel|>analysis<|message|>Hmm <| not a token |> 1<2.<|end|><|start|>assistant<|channel|>final<|message|>Done"
    whole = parser(tokenizer)
    a, b = whole.feed(text), whole.finish()
    streamed = stream_through(tokenizer, text, parser(tokenizer))
    assert (a.reasoning + b.reasoning, a.content + b.content) == (streamed.reasoning, streamed.content)
    assert streamed.reasoning == "Hmm <| not a token |> 1<2." and streamed.content == "Done"


def test_a_stream_cut_inside_reasoning_ends_cleanly(tokenizer: Any) -> None:
    out = stream_through(tokenizer, "<|channel|>analysis<|message|>Let me think about", parser(tokenizer), cut=True)
    assert out.reasoning == "Let me think about" and out.content == "" and out.calls == []


def test_a_call_cut_short_is_dropped_never_content(tokenizer: Any) -> None:
    p = parser(tokenizer)
    text = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Par'
    out = stream_through(tokenizer, text, p, cut=True)
    assert (out.content, out.calls, p.dropped_unfinished) == ("", [], True)


def test_special_tokens_never_reach_content(tokenizer: Any) -> None:
    text = "<|channel|>final<|message|>A<|reserved_200000|>B<|constrain|>C"
    assert stream_through(tokenizer, text, parser(tokenizer)).content == "ABC"


def test_calls_without_offered_tools_and_beyond_max_calls_are_dropped(tokenizer: Any) -> None:
    call = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Rome", "days": 1}'
    assert stream_through(tokenizer, call, parser(tokenizer, offered=False)) == OutputDelta()
    two = call + "<|call|>" + call.replace("Rome", "Oslo")
    out = stream_through(tokenizer, two, parser(tokenizer, max_calls=1))
    assert [json.loads(c.arguments)["city"] for c in out.calls] == ["Rome"]


def test_output_that_is_not_harmony_is_content(tokenizer: Any) -> None:
    text = "plain words " * 20
    assert stream_through(tokenizer, text, parser(tokenizer)).content == text


def test_special_tokens_are_skipped_unless_asked(tokenizer: Any) -> None:
    """The engine's default decoding drops special tokens; harmony needs them (SamplingParams field)."""
    ids = tokenizer.encode("<|channel|>final<|message|>Hi", add_special_tokens=False)

    def decoded(skip: bool) -> str:
        detok = IncrementalDetokenizer(IdsToText(tokenizer), skip_special_tokens=skip)
        return "".join(detok.add(i) for i in ids) + detok.flush()

    assert SamplingParams().skip_special_tokens is True
    assert decoded(True) == "finalHi"
    assert decoded(False) == "<|channel|>final<|message|>Hi"


# -- the template ---------------------------------------------------------------------------------------


def prompt_text(registry: ModelRegistry, body: dict[str, Any]) -> str:
    served = registry.get(MODEL)
    plan = prepare(ChatCompletionRequest(**{"max_tokens": 4, **body}), served, RequestScope(None), None)
    return str(served.tokenizer.decode(list(plan.request.prompt_token_ids), skip_special_tokens=False))


def test_reasoning_effort_reaches_the_template(registry: ModelRegistry) -> None:
    from server.wire.chat import ChatMessage

    messages = [ChatMessage(role="user", content="hi")]
    assert "Reasoning: high\n" in prompt_text(registry, {"messages": messages, "reasoning_effort": "high"})
    assert "Reasoning: low\n" in prompt_text(registry, {"messages": messages, "reasoning_effort": "low"})
    assert "Reasoning: medium\n" in prompt_text(registry, {"messages": messages})


def test_call_and_result_round_trip_through_the_template(base: str, registry: ModelRegistry) -> None:
    from msgspec import convert

    from server.wire.chat import ChatMessage, Tool

    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris","days":1}'},
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    text = prompt_text(
        registry,
        {"messages": convert(messages, list[ChatMessage]), "tools": convert([WEATHER, TIME], list[Tool])},
    )
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Tools" in text
    assert "type get_weather = (_: {\n// " not in text and "type get_time = (_: {\nzone: " in text
    assert (
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris", "days": 1}<|call|>'
        in text
    )
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"sunny"<|end|>' in text
    assert (
        "<|start|>assistant<|channel|>final<|message|>Sunny.<|end|><|start|>user<|message|>And tomorrow?<|end|>" in text
    )
    assert text.endswith("<|start|>assistant")
    # the same conversation over HTTP renders and generates
    answer = chat(base, {"messages": messages, "tools": [WEATHER, TIME], "max_tokens": 3})
    assert answer["choices"][0]["finish_reason"] in ("length", "stop", "tool_calls")


# -- over HTTP ----------------------------------------------------------------------------------------


def chat(base: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "temperature": 0, **body}, timeout=300)
    assert response.status_code == status, response.text
    return response.json()  # type: ignore[no-any-return]


def chat_stream(base: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    payload = {"model": MODEL, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **body}
    chunks = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=payload, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks


def token_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, ids
    return int(ids[0])


@pytest.fixture
def short_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced analysis ends after 16 characters, so a model biased into reasoning reaches its answer."""
    monkeypatch.setattr(tool_grammar, "HARMONY_ANALYSIS_CHARS", 16)


def leaks(text: str, tokenizer: Any) -> list[str]:
    return [s for s in special_texts(tokenizer) if s in text]


def test_reasoning_and_answer_are_apart_in_json(base: str, tokenizer: Any, short_analysis: None) -> None:
    bias = {str(token_id(tokenizer, "analysis")): 100}
    body = {"messages": USER, "max_tokens": 60, "response_format": ANSWER, "logit_bias": bias}
    answer = chat(base, body)
    message = answer["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == "analysisanalysis"
    assert set(json.loads(message["content"])) == {"answer"}  # the final channel's JSON, nothing else
    assert not leaks(message["content"], tokenizer)
    details = answer["usage"]["completion_tokens_details"]
    assert 2 <= details["reasoning_tokens"] < answer["usage"]["completion_tokens"]


def test_reasoning_and_answer_are_apart_in_sse(base: str, tokenizer: Any, short_analysis: None) -> None:
    bias = {str(token_id(tokenizer, "analysis")): 100}
    chunks = chat_stream(base, {"messages": USER, "max_tokens": 60, "response_format": ANSWER, "logit_bias": bias})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert reasoning == "analysisanalysis" and set(json.loads(content)) == {"answer"}
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] >= 2


def test_a_stream_cut_inside_reasoning_ends_cleanly_over_http(base: str, tokenizer: Any) -> None:
    bias = {str(token_id(tokenizer, "analysis")): 100}
    chunks = chat_stream(base, {"messages": USER, "max_tokens": 8, "response_format": ANSWER, "logit_bias": bias})
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(d["delta"].get("reasoning_content") or "" for d in deltas).startswith("analysis")
    assert "".join(d["delta"].get("content") or "" for d in deltas) == ""
    assert deltas[-1]["finish_reason"] == "length"


def check_weather_call(call: dict[str, Any]) -> None:
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    assert set(arguments) == {"city", "days"} and isinstance(arguments["days"], int)
    assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 12


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_parses_whatever_the_weights_prefer(base: str, tokenizer: Any, choice: Any) -> None:
    answer = chat(
        base,
        {
            "messages": USER,
            "tools": [WEATHER, TIME] if choice != "required" else [WEATHER],
            "tool_choice": choice,
            "max_tokens": 200,
        },
    )
    first = answer["choices"][0]
    assert first["finish_reason"] == "tool_calls", first
    assert not first["message"]["content"]
    [call] = first["message"]["tool_calls"]
    check_weather_call(call)


def test_a_forced_call_after_reasoning(base: str, tokenizer: Any, short_analysis: None) -> None:
    bias = {str(token_id(tokenizer, "analysis")): 100}
    answer = chat(
        base, {"messages": USER, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 200, "logit_bias": bias}
    )
    first = answer["choices"][0]
    assert first["message"]["reasoning_content"] == "analysisanalysis"
    assert first["finish_reason"] == "tool_calls"
    check_weather_call(first["message"]["tool_calls"][0])


def test_a_forced_call_streams_as_tool_call_deltas(base: str) -> None:
    chunks = chat_stream(base, {"messages": USER, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 200})
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls") or []]
    assert {tc["index"] for tc in calls} == {0}
    assert calls[0]["id"].startswith("call_") and all(tc.get("id") in (None, calls[0]["id"]) for tc in calls)
    arguments = "".join(tc["function"].get("arguments") or "" for tc in calls)
    check_weather_call({"type": "function", "function": {"name": calls[0]["function"]["name"], "arguments": arguments}})
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert "".join(d["delta"].get("content") or "" for d in deltas) == ""


def test_unconstrained_output_never_shows_special_tokens(base: str, tokenizer: Any) -> None:
    answer = chat(base, {"messages": USER, "max_tokens": 40, "temperature": 1.0, "seed": 7, "tools": [WEATHER]})
    message = answer["choices"][0]["message"]
    shown = (message.get("content") or "") + (message.get("reasoning_content") or "")
    assert not leaks(shown, tokenizer)


def test_bad_reasoning_effort_and_a_template_error_are_400s(base: str) -> None:
    bad = chat(base, {"messages": USER, "reasoning_effort": "extreme"}, status=400)
    assert bad["error"]["param"] == "reasoning_effort"
    orphan = [*USER, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]  # the template raises
    error = chat(base, {"messages": orphan, "max_tokens": 2}, status=400)["error"]
    assert error["type"] == "invalid_request_error" and "tool" in error["message"]


def test_responses_api_forced_call_and_effort(base: str) -> None:
    tool = {"type": "function", **WEATHER["function"]}
    body = {"model": MODEL, "input": "Weather in Paris?", "tools": [tool], "tool_choice": "required"}
    response = httpx.post(
        base + "/v1/responses", json={**body, "temperature": 0, "max_output_tokens": 200}, timeout=300
    )
    assert response.status_code == 200, response.text
    [call] = [item for item in response.json()["output"] if item["type"] == "function_call"]
    check_weather_call({"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}})
    bad = httpx.post(base + "/v1/responses", json={**body, "reasoning": {"effort": "max"}}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning.effort"
