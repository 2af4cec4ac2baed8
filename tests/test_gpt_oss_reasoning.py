"""gpt-oss reasoning through the Responses API, and past reasoning back into its template.

The analysis channel becomes a `reasoning` output item and `response.reasoning_text.delta` events: the
Responses output path fed real token streams of the tiny harmony model, and the real app over HTTP, where
the response format's grammar (an optional analysis, then the final message) leads the tiny model into
its analysis. Past reasoning sent back (chat's `reasoning_content` or `reasoning`, the Responses API's
reasoning items) reaches the template's `thinking` field on a tool-call turn; a turn with a preamble as
well is one analysis, as the template demands. Model and fixtures: tests/test_gpt_oss.py's.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from msgspec import convert

from server.engine.detokenizer import IdsToText, IncrementalDetokenizer
from server.registry import ModelRegistry
from server.serving.generation import build_prompt
from server.serving.harmony import HarmonyParser, special_texts
from server.serving.model_output import ChoiceOutput
from server.serving.response_output import OutputBuilder
from server.serving.responses import chat_messages, input_items
from server.wire.chat import ChatMessage, Tool
from server.wire.codec import encode
from server.wire.responses import InputContent, InputItem
from tests import test_gpt_oss as oss
from tests.test_gpt_oss import ANSWER, MODEL, WEATHER, prompt_text

# the tiny gpt-oss model and its server, as tests/test_gpt_oss.py builds them (one per module)
model_dir, registry, tokenizer, base = oss.model_dir, oss.registry, oss.tokenizer, oss.base
short_analysis, pinned_date = oss.short_analysis, oss.pinned_date

CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Paris","days":1}'},
}
ANALYSIS = "<|start|>assistant<|channel|>analysis<|message|>Need the weather.<|end|>"
CALLED = '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris", "days": 1}'


def _build(tokenizer: Any, text: str, tools: bool) -> tuple[OutputBuilder, list[dict[str, Any]]]:
    """`text` as the model's tokens, streamed through the Responses output path: the builder and its events."""
    builder = OutputBuilder(ChoiceOutput(HarmonyParser(tools, None, special_texts(tokenizer)), None))
    detok = IncrementalDetokenizer(IdsToText(tokenizer), skip_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    events = []
    for k, token_id in enumerate(ids):
        last = k == len(ids) - 1
        piece = detok.add(token_id) + (detok.flush() if last else "")
        events += builder.feed(token_id, piece, "stop" if last else None)
    events += builder.close("stop")
    return builder, [json.loads(encode(e)) for e in events]


def _items(builder: OutputBuilder) -> list[dict[str, Any]]:
    return [json.loads(encode(item)) for item in builder.items]


def test_analysis_becomes_a_reasoning_item_and_reasoning_text_events(tokenizer: Any) -> None:
    text = "<|channel|>analysis<|message|>User wants weather.<|end|><|start|>assistant<|channel|>final<|message|>Sunny."
    builder, events = _build(tokenizer, text, tools=False)
    items = _items(builder)
    assert [i["type"] for i in items] == ["reasoning", "message"]
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "User wants weather."}]
    assert items[1]["content"][0]["text"] == "Sunny."
    deltas = [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"]
    assert "".join(deltas) == "User wants weather." and len(deltas) > 1  # streamed token by token
    types = [e["type"] for e in events]
    assert types.index("response.reasoning_text.done") < types.index("response.output_text.delta")
    assert builder.output.reasoning_tokens >= len(deltas)
    assert not any(s in json.dumps(events) for s in ("<|channel|>", "<|message|>", "<|end|>"))


def test_analysis_then_a_commentary_call_is_reasoning_then_a_function_call(tokenizer: Any) -> None:
    text = (
        "<|channel|>analysis<|message|>Call the tool.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris","days":2}'
    )
    builder, events = _build(tokenizer, text, tools=True)
    items = _items(builder)
    assert [i["type"] for i in items] == ["reasoning", "function_call"]
    assert items[0]["content"][0]["text"] == "Call the tool."
    assert items[1]["name"] == "get_weather" and json.loads(items[1]["arguments"]) == {"city": "Paris", "days": 2}
    assert "response.output_text.delta" not in [e["type"] for e in events]


def test_responses_over_http_reasoning_item_and_events(base: str, short_analysis: None) -> None:
    """The response format's grammar lets the analysis come first; at temperature 0 the tiny model takes
    it for this input, and the analysis is cut at 16 characters (short_analysis) so the answer follows."""
    body = {
        "model": MODEL, "input": "Weather in Paris?", "temperature": 0, "max_output_tokens": 60,
        "text": {"format": {"type": "json_schema", **ANSWER["json_schema"]}},
    }  # fmt: skip
    data = httpx.post(base + "/v1/responses", json=body, timeout=300).json()
    assert [item["type"] for item in data["output"]] == ["reasoning", "message"], data
    reasoning = data["output"][0]["content"][0]["text"]
    assert reasoning and set(json.loads(data["output"][1]["content"][0]["text"])) == {"answer"}
    assert data["usage"]["output_tokens_details"]["reasoning_tokens"] >= 2
    with httpx.stream("POST", base + "/v1/responses", json={**body, "stream": True}, timeout=300) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line) for line in lines]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert deltas == reasoning
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["item"]["type"] for e in done] == ["reasoning", "message"]


def _messages(**turn: Any) -> list[ChatMessage]:
    return convert(
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL], **turn},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        list[ChatMessage],
    )


def test_past_reasoning_reaches_the_template_on_a_tool_call_turn(registry: ModelRegistry) -> None:
    tools = convert([WEATHER], list[Tool])
    for field in ("reasoning_content", "reasoning"):
        text = prompt_text(registry, {"messages": _messages(**{field: "Need the weather."}), "tools": tools})
        assert ANALYSIS + CALLED in text, field
    without = prompt_text(registry, {"messages": _messages(), "tools": tools})
    assert "analysis" not in without.split("<|start|>user")[-1]


def test_a_preamble_and_past_reasoning_on_one_tool_call_turn_render_as_one_analysis(
    base: str, registry: ModelRegistry
) -> None:
    """The template refuses a tool-call turn with both `content` and `thinking`: our own output, sent back."""
    tools = convert([WEATHER], list[Tool])
    turn = {"content": "Let me look.", "reasoning_content": "Need the weather."}
    text = prompt_text(registry, {"messages": _messages(**turn), "tools": tools})
    assert "<|channel|>analysis<|message|>Need the weather.\n\nLet me look.<|end|>" + CALLED in text
    messages = json.loads(encode(_messages(**turn)))
    body = {"model": MODEL, "messages": messages, "tools": [WEATHER], "max_tokens": 2, "temperature": 0}
    response = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text


def test_responses_reasoning_items_reach_the_template(registry: ModelRegistry) -> None:
    items = input_items(
        [
            InputItem(role="user", content="Weather in Paris?"),
            InputItem(type="reasoning", content=[InputContent(type="reasoning_text", text="Need the weather.")]),
            InputItem(
                type="function_call", call_id="call_1", name="get_weather", arguments=CALL["function"]["arguments"]
            ),  # type: ignore[index]
            InputItem(type="function_call_output", call_id="call_1", output="sunny"),
        ]
    )
    tokenizer = registry.get(MODEL).tokenizer
    prompt, _ = build_prompt(tokenizer, chat_messages(items, None), [WEATHER], "auto", None)
    assert ANALYSIS + CALLED in tokenizer.decode(prompt, skip_special_tokens=False)
