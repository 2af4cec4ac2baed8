"""Reasoning output of a thinking model: kept out of `content`, returned where agent frameworks read it.

Runs against the model COMPAT_THINKING_MODEL names (skipped without one). Chat completions carry the
reasoning as `message.reasoning_content` (DeepSeek's and vLLM's name) and `message.reasoning`
(mlx_lm.server's and OpenRouter's), streams as `delta.reasoning_content`, and count it in
`usage.completion_tokens_details.reasoning_tokens`; the Responses API returns a `reasoning` item before
the message and streams `response.reasoning_text.delta` events. COMPAT_REASONING_MAX_TOKENS bounds each
generation (default 1024: room for a real model to finish thinking; a generation cut inside its
reasoning must still return that reasoning as reasoning).
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import openai

MAX_TOKENS = int(os.environ.get("COMPAT_REASONING_MAX_TOKENS", "1024"))
QUESTION = [{"role": "user", "content": "Is 91 a prime number? Think it through, then answer yes or no."}]
MARKUP = ("<think>", "</think>", "[THINK]", "[/THINK]", "<|channel|>")


def _no_markup(text: str | None) -> None:
    assert not any(marker in (text or "") for marker in MARKUP), f"think markup in content: {text!r}"


def test_chat_reasoning_content(http: httpx.Client, thinking_model: str) -> None:
    body = {"model": thinking_model, "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = http.post("/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    message = data["choices"][0]["message"]
    assert isinstance(message.get("reasoning_content"), str) and message["reasoning_content"].strip(), message
    assert message.get("reasoning") == message["reasoning_content"]
    _no_markup(message["content"])
    _no_markup(message["reasoning_content"])
    usage = data["usage"]
    reasoning_tokens = usage["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < reasoning_tokens <= usage["completion_tokens"], usage


def test_chat_stream_reasoning_deltas(client: openai.OpenAI, thinking_model: str) -> None:
    stream = client.chat.completions.create(
        model=thinking_model,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, content, order, usage = "", "", [], None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            extra: dict[str, Any] = choice.delta.model_extra or {}
            if extra.get("reasoning_content"):
                reasoning += extra["reasoning_content"]
                order.append("reasoning")
            if choice.delta.content:
                content += choice.delta.content
                order.append("content")
    assert reasoning.strip(), "no delta.reasoning_content in the stream"
    assert (
        order[0] == "reasoning" and "reasoning" not in order[order.index("content") :] if "content" in order else True
    )
    _no_markup(content)
    _no_markup(reasoning)
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens > 0


def test_responses_reasoning_item(client: openai.OpenAI, thinking_model: str) -> None:
    r = client.responses.create(
        model=thinking_model, input=QUESTION, max_output_tokens=MAX_TOKENS, temperature=0, store=False
    )  # type: ignore[arg-type]
    kinds = [item.type for item in r.output]
    assert kinds and kinds[0] == "reasoning", kinds
    item = r.output[0]
    assert item.content and item.content[0].type == "reasoning_text" and item.content[0].text.strip()  # type: ignore[union-attr]
    assert item.summary == []  # type: ignore[union-attr]
    assert "message" in kinds or r.status == "incomplete", kinds
    _no_markup(r.output_text)
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens > 0


def test_responses_stream_reasoning_events(client: openai.OpenAI, thinking_model: str) -> None:
    stream = client.responses.create(
        model=thinking_model, input=QUESTION, max_output_tokens=MAX_TOKENS, temperature=0, store=False, stream=True
    )  # type: ignore[arg-type]
    events = list(stream)
    types = [e.type for e in events]
    assert "response.reasoning_text.delta" in types, sorted(set(types))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")  # type: ignore[union-attr]
    done = [e for e in events if e.type == "response.reasoning_text.done"]
    assert len(done) == 1 and done[0].text == deltas  # type: ignore[union-attr]
    if "response.output_text.delta" in types:
        assert types.index("response.reasoning_text.done") < types.index("response.output_text.delta")
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert final.response.output[0].type == "reasoning"  # type: ignore[union-attr]


def test_reasoning_returned_in_a_follow_up_turn(http: httpx.Client, thinking_model: str) -> None:
    """An assistant turn sent back with its reasoning_content is accepted (templates drop or render it)."""
    messages = [
        *QUESTION,
        {"role": "assistant", "content": "No.", "reasoning_content": "91 = 7 * 13."},
        {"role": "user", "content": json.dumps("And 97?")},
    ]
    r = http.post(
        "/chat/completions", json={"model": thinking_model, "messages": messages, "max_tokens": 8, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    _no_markup(r.json()["choices"][0]["message"]["content"])
