"""Reasoning kept apart from the answer, for think-tag model families (real templates, real token streams).

Unit level: each family's real template is rendered, the output it would give is encoded with the
family's tokenizer and streamed through the engine's detokenizer, one token at a time, into the output
parser. End to end: tiny random-weight Qwen3.5 (its template opens the think block in the prompt) and
Qwen3 (the model opens it itself) models served over HTTP; random weights never close their reasoning,
so a `</think>` is pushed with `logit_bias` where a test needs an answer after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from server.engine.constraints import ConstraintFactory, GrammarSpec
from server.model_lifecycle import load, unload
from server.registry import ModelRegistry, ServedModel
from server.serving.model_output import ChoiceOutput, output_parser
from server.serving.prompt import render_prompt
from server.serving.reasoning import ReasoningMode, ReasoningSplitter, ThinkMarkers, reasoning_mode
from server.serving.tools import tool_format
from tests.real_vocab import QWEN3_ADDED, tiny_model_dir
from tests.reasoning_models import FAMILIES, stream_text, think_tokenizer
from tests.serving import running_server

BODY = "Let me think.\nStep 1: 2+3=5."
ANSWER = "The answer is 5."
THINK_START, THINK_END = 151667, 151668  # `<think>`, `</think>` in Qwen3's vocabulary
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reasoning")


def _run(tokenizer: Any, mode: ReasoningMode, text: str, finish: str = "stop", tools: Any = None) -> Any:
    """Stream `text` (encoded, decoded token by token) through a choice's parser; the joined output."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    fmt = tool_format(tokenizer) if tools else None
    choice = ChoiceOutput(output_parser(None, tools, fmt, None, mode), mode)  # type: ignore[arg-type]
    reasoning, content, calls = "", "", []
    for k, (token_id, piece) in enumerate(zip(ids, stream_text(tokenizer, ids), strict=True)):
        delta = choice.add(token_id, piece, finish if k == len(ids) - 1 else None)
        reasoning, content, calls = reasoning + delta.reasoning, content + delta.content, calls + delta.calls
    return reasoning, content, calls, choice.reasoning_tokens, ids


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_reasoning_is_separated(root: Path, family: str) -> None:
    tokenizer = think_tokenizer(root / "tok", family)
    mode = reasoning_mode(tokenizer, render_prompt(tokenizer, MESSAGES, None))
    assert mode is not None, f"{family}: no think markers found"
    start, end = mode.markers.start, mode.markers.end
    opened = "" if mode.starts_inside else f"{start}\n"
    reasoning, content, _, counted, ids = _run(tokenizer, mode, f"{opened}{BODY}\n{end}\n\n{ANSWER}")
    assert (reasoning, content) == (BODY, ANSWER), family
    answer_ids = tokenizer.encode(f"\n\n{ANSWER}", add_special_tokens=False)
    assert counted == len(ids) - len(answer_ids), "reasoning tokens: the block and its markers"


def test_prompt_that_closed_the_block_starts_in_the_answer(root: Path) -> None:
    tokenizer = think_tokenizer(root / "tok", "qwen3.5")
    closed = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=False)
    opened = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=True)
    assert reasoning_mode(tokenizer, closed).starts_inside is False  # type: ignore[union-attr]
    assert reasoning_mode(tokenizer, opened).starts_inside is True  # type: ignore[union-attr]
    reasoning, content, *_ = _run(tokenizer, reasoning_mode(tokenizer, closed), ANSWER)  # type: ignore[arg-type]
    assert (reasoning, content) == ("", ANSWER)


class _CountingVocab:
    """A real tokenizer that counts how often its whole vocabulary is read."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.reads = tokenizer, 0
        self.chat_template = tokenizer.chat_template

    def get_vocab(self) -> Any:
        self.reads += 1
        return self.tokenizer.get_vocab()

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.encode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.decode(*args, **kwargs)


def test_think_markers_are_found_once_per_tokenizer_not_per_request(root: Path) -> None:
    """Reading Qwen's 151k-token vocabulary took ~90 ms, and every chat request paid it."""
    tokenizer = think_tokenizer(root / "tok", "qwen3.5")
    counting = _CountingVocab(tokenizer)
    prompt = render_prompt(tokenizer, MESSAGES, None)
    modes = [reasoning_mode(counting, prompt) for _ in range(3)]
    assert all(m is not None and m.markers.start == "<think>" for m in modes)
    assert counting.reads == 1


def test_a_tool_call_inside_reasoning_is_reasoning(root: Path) -> None:
    tokenizer = think_tokenizer(root / "tok", "qwen3")
    mode = ReasoningMode(ThinkMarkers("<think>", "</think>", (THINK_END,)))
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    thought = 'I could call <tool_call>{"name": "add", "arguments": {}}</tool_call> here.'
    text = f'<think>\n{thought}\n</think>\n\n<tool_call>\n{{"name": "add", "arguments": {{"a": 2}}}}\n</tool_call>'
    reasoning, content, calls, *_ = _run(tokenizer, mode, text, tools=tools)
    assert reasoning == thought and content.strip() == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 2})]


def test_markers_split_across_tokens_are_held_back() -> None:
    splitter = ReasoningSplitter(ReasoningMode(ThinkMarkers("<think>", "</think>")))
    text = f"<think>\n{BODY}\n</think>\n\n{ANSWER}"
    pieces = [splitter.feed(ch) for ch in text] + [splitter.finish()]
    shown = "".join(r + c for r, c in pieces)
    assert "<" not in shown and ">" not in shown
    assert "".join(r for r, _ in pieces) == BODY and "".join(c for _, c in pieces) == ANSWER


def test_output_without_a_think_block_is_all_answer() -> None:
    splitter = ReasoningSplitter(ReasoningMode(ThinkMarkers("<think>", "</think>")))
    assert splitter.feed("  <thi") == ("", "")  # undecided: could be the start marker
    assert splitter.feed("s is text") == ("", "  <this is text")
    assert splitter.finish() == ("", "")


def test_a_cut_inside_reasoning_keeps_the_reasoning_and_drops_a_partial_marker() -> None:
    splitter = ReasoningSplitter(ReasoningMode(ThinkMarkers("<think>", "</think>"), starts_inside=True))
    assert splitter.feed("Thinking hard\n</th") == ("Thinking hard", "")
    assert splitter.finish(cut=True) == ("", "")


def test_grammar_after_the_end_marker(root: Path) -> None:
    tokenizer = think_tokenizer(root / "tok", "qwen3")
    factory = ConstraintFactory(tokenizer, 151936, [tokenizer.convert_tokens_to_ids("<|im_end|>")])
    spec = GrammarSpec.from_response_format({"type": "json_object"})
    constraint = factory.create(GrammarSpec("json_object", after=(THINK_END,)))
    assert len(constraint.allowed_token_ids()) == 151936 and not constraint.finished  # free while reasoning
    for token_id in tokenizer.encode("not json {", add_special_tokens=False):
        constraint.advance(token_id)
    assert constraint.error is None and not constraint.active
    constraint.advance(THINK_END)
    assert constraint.active
    assert len(constraint.allowed_token_ids()) < 151936
    assert (factory.create(spec).allowed_token_ids() == constraint.allowed_token_ids()).all()


# -- end to end, over HTTP --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(root: Path) -> Iterator[str]:
    registry = ModelRegistry()
    specs = {"qwen3.5-think": "Qwen3.5-4B", "qwen3-think": "Qwen-Qwen3-0.6B"}
    for name, template in specs.items():
        path = tiny_model_dir(
            root / name, vocab="qwen35" if "3.5" in name else "qwen2", template=template, model_type="qwen3",
            eos_token="<|im_end|>", added=QWEN3_ADDED,
        )  # fmt: skip
        registry.add(ServedModel(id=name, kind="chat", path=path))
    settings = Settings(cache_dir=root / "cache", data_dir=root / "data", kv_cache_gb=0.05)
    load(registry, settings)
    registry.mark_ready()
    try:
        with running_server(create_app(settings, registry)) as url:
            yield url
    finally:
        for served in registry.list():
            unload(served)


def post(base: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(base + "/v1" + path, json=body, timeout=120)


def sse(response: httpx.Response) -> list[dict[str, Any]]:
    lines = response.text.splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def test_chat_cut_inside_reasoning(base: str) -> None:
    body = {"model": "qwen3.5-think", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    data = post(base, "/chat/completions", body).json()
    message, usage = data["choices"][0]["message"], data["usage"]
    assert data["choices"][0]["finish_reason"] == "length"
    assert message["content"] == "" and message["reasoning_content"] == message["reasoning"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == usage["completion_tokens"] == 6
    chunks = sse(post(base, "/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6


def test_response_format_applies_after_the_reasoning(base: str) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"enum": [1, 2, 3]}},
        "required": ["n"],
        "additionalProperties": False,
    }
    body = {
        "model": "qwen3.5-think", "messages": MESSAGES, "max_tokens": 64, "temperature": 1.0, "seed": 7,
        "logit_bias": {str(THINK_END): 12},
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}},
    }  # fmt: skip
    for seed in (7, 8, 9):
        data = post(base, "/chat/completions", {**body, "seed": seed}).json()
        choice = data["choices"][0]
        assert choice["finish_reason"] == "stop", data
        assert json.loads(choice["message"]["content"])["n"] in (1, 2, 3)
        assert "</think>" not in choice["message"]["reasoning_content"]
        assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] >= 1


def test_responses_reasoning_item_and_events(base: str) -> None:
    body = {"model": "qwen3.5-think", "input": "What is 2+3?", "max_output_tokens": 5, "temperature": 0}
    data = post(base, "/responses", body).json()
    assert [item["type"] for item in data["output"]] == ["reasoning", "message"]
    reasoning = data["output"][0]
    assert reasoning["summary"] == [] and reasoning["content"][0]["type"] == "reasoning_text"
    assert data["status"] == "incomplete" and data["usage"]["output_tokens_details"]["reasoning_tokens"] == 5
    events = sse(post(base, "/responses", {**body, "stream": True}))
    types = [e["type"] for e in events]
    assert "response.reasoning_text.delta" in types and types.count("response.reasoning_text.done") == 1
    text = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert text == reasoning["content"][0]["text"]


def test_model_that_opens_its_own_block(base: str) -> None:
    """Qwen3's template leaves opening the block to the model: a pushed `<think>` starts the reasoning."""
    body = {
        "model": "qwen3-think",
        "messages": MESSAGES,
        "max_tokens": 4,
        "temperature": 0,
        "logit_bias": {"151667": 30},
    }
    message = post(base, "/chat/completions", body).json()["choices"][0]["message"]
    assert message["content"] == "" and message["reasoning_content"].startswith("<think>")  # later <think>s are text


PAINT = {
    "type": "function",
    "function": {
        "name": "paint",
        "parameters": {
            "type": "object",
            "properties": {"color": {"type": "string", "enum": ["red", "green"]}},
            "required": ["color"],
        },
    },
}


def _painted(choice: dict[str, Any]) -> None:
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "paint"
    assert json.loads(call["function"]["arguments"])["color"] in ("red", "green")


def test_forced_call_after_a_think_block_the_model_opens(base: str) -> None:
    """Qwen3's prompt leaves the block to the model: pushed into `<think>` (the forcing grammar's first
    token would otherwise be `<tool_call>`), it reasons, closes the block, and the call still parses."""
    body = {
        "model": "qwen3-think", "messages": MESSAGES, "tools": [PAINT], "tool_choice": "required",
        "max_tokens": 80, "temperature": 1.0, "logit_bias": {str(THINK_START): 6, str(THINK_END): 11},
    }  # fmt: skip
    reasoned = []
    for seed in (1, 2, 3):
        data = post(base, "/chat/completions", {**body, "seed": seed}).json()
        choice = data["choices"][0]
        _painted(choice)
        assert not choice["message"]["content"] and "think>" not in choice["message"]["reasoning_content"]
        assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] >= 2  # the block's two markers
        reasoned.append(choice["message"]["reasoning_content"])
    assert any(reasoned), "some reasoning between the markers"
    chunks = sse(post(base, "/chat/completions", {**body, "seed": 1, "stream": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert calls and {tc["index"] for tc in calls} == {0} and not "".join(d.get("content") or "" for d in deltas)


def test_forced_call_whatever_the_weights_prefer_and_with_thinking_off(base: str) -> None:
    """Unpushed, the random weights may open a block or not: the budget (half of max_tokens) closes it in
    time, so the call parses either way. With thinking off the prompt closes the block: plain grammar."""
    body = {
        "model": "qwen3-think", "messages": MESSAGES, "tools": [PAINT], "tool_choice": "required",
        "max_tokens": 60, "temperature": 0,
    }  # fmt: skip
    _painted(post(base, "/chat/completions", body).json()["choices"][0])
    off = {**body, "chat_template_kwargs": {"enable_thinking": False}, "logit_bias": {str(THINK_START): 30}}
    data = post(base, "/chat/completions", off).json()
    _painted(data["choices"][0])  # `<think>` pushed, yet not allowed: the grammar has it from the first token
    assert not data["choices"][0]["message"].get("reasoning_content")
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_response_format_after_a_think_block_the_model_opens(base: str) -> None:
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"], "additionalProperties": False}
    body = {
        "model": "qwen3-think", "messages": MESSAGES, "max_tokens": 80, "temperature": 1.0, "seed": 5,
        "logit_bias": {str(THINK_START): 6, str(THINK_END): 11},
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}},
    }  # fmt: skip
    reasoned = []
    for seed in (5, 6, 7):
        data = post(base, "/chat/completions", {**body, "seed": seed}).json()
        choice = data["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        assert json.loads(choice["message"]["content"])["n"] in (1, 2)
        assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] >= 2  # the block's two markers
        reasoned.append(choice["message"]["reasoning_content"])
    assert any(reasoned), "some reasoning between the markers"


def test_compat_kit_reasoning_checks(base: str) -> None:
    """The conformance kit's reasoning checks, run against this server's tiny thinking model."""
    env = {
        **os.environ, "COMPAT_BASE_URL": base + "/v1", "COMPAT_THINKING_MODEL": "qwen3.5-think",
        "COMPAT_REASONING_MAX_TOKENS": "12",
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "compat/test_reasoning.py"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert "5 passed" in result.stdout


def test_reasoning_items_sent_back_join_the_next_assistant_turn() -> None:
    from server.serving.responses import chat_messages, input_items
    from server.wire.responses import InputContent, InputItem

    thought = [InputContent(type="reasoning_text", text="2+3 is 5.")]
    items = input_items(
        [
            InputItem(role="user", content="What is 2+3?"),
            InputItem(type="reasoning", content=thought),
            InputItem(role="assistant", content="5"),
        ]
    )
    thought = "2+3 is 5."
    assert chat_messages(items, None)[1] == {
        "role": "assistant", "content": "5", "reasoning_content": thought, "thinking": thought, "reasoning": thought,
    }  # fmt: skip
