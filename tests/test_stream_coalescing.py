"""A reader that falls behind catches up in one chunk: with the real engine (the default SmolLM2 model), a
streamed chat, completion or response read slowly gets every token that waited in one content chunk (one
delta), the same text as the non-streamed greedy answer, one logprob entry per token, Responses sequence
numbers still consecutive. Over HTTP a reader that keeps up still gets one chunk per token.

Chat and completions ban the EOS token (logit_bias), so every answer is exactly MAX_TOKENS tokens long."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from server.app import create_app
from server.config import Settings
from server.engine.engine import Engine
from server.persistence.database import SqliteDatabase
from server.persistence.responses import ResponseStore
from server.registry import ModelRegistry, ServedModel
from server.serving import chat, completions, response_output, responses
from server.serving.scope import RequestScope
from server.wire.chat import ChatCompletionRequest
from server.wire.completions import CompletionRequest
from server.wire.responses import ResponseRequest
from tests.serving import running_server

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 16
PROMPT = "Write a long story about a dragon who learns to paint."
SCOPE = RequestScope("public")


@pytest.fixture(scope="module")
def served(registry: ModelRegistry) -> ServedModel:
    return registry.get(MODEL)


def _no_eos(served: ServedModel) -> dict[str, float]:
    return {str(token): -100.0 for token in served.running_engine.eos_ids}


def _idle(served: ServedModel, timeout: float = 60.0) -> None:
    """Wait until the engine has no sequence left (what a slow reader waits out: every token is pending)."""
    engine = served.running_engine
    assert isinstance(engine, Engine)
    deadline = time.monotonic() + timeout
    while engine.stats().running + engine.stats().waiting:
        assert time.monotonic() < deadline, "the engine did not finish"
        time.sleep(0.02)


async def _read_slowly(served: ServedModel, items: AsyncGenerator[bytes, None], before_wait: int) -> list[bytes]:
    """Every item; after the first `before_wait` items, wait (off the loop) until the engine finished generating."""
    out = []
    async for item in items:
        out.append(item)
        if len(out) == before_wait:
            await asyncio.to_thread(_idle, served)
    return out


def _data(items: list[bytes]) -> list[list[dict[str, Any]]]:
    """Each item's `data:` payloads as JSON ([DONE] left out)."""
    out = []
    for item in items:
        assert item.endswith(b"\n\n")
        payloads = [e.removeprefix(b"data: ") for e in item[:-2].split(b"\n\n")]
        out.append([json.loads(p) for p in payloads if p != b"[DONE]"])
    return out


def _chat_plan(served: ServedModel, stream: bool, **extra: Any) -> chat.ChatPlan:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logit_bias": _no_eos(served),
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
        **extra,
    }
    return chat.prepare(msgspec.convert(body, ChatCompletionRequest), served, SCOPE, None)


def _chat_coalesced(served: ServedModel, **extra: Any) -> tuple[list[list[dict[str, Any]]], str]:
    streamed = asyncio.run(_read_slowly(served, chat.stream(_chat_plan(served, True, **extra)), before_wait=2))
    answer = asyncio.run(chat.complete(_chat_plan(served, False, **extra)))
    content = answer.choices[0].message.content
    assert isinstance(content, str)
    return _data(streamed), content


def _usage(items: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The usage chunk: the last before [DONE], in the last item (the last batch, usage and [DONE] are one write)."""
    assert items[-1][-1].get("usage") is not None and not items[-1][-1]["choices"]
    usage: dict[str, Any] = items[-1][-1]["usage"]
    return usage


def _content_chunks(items: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [c for item in items for c in item if c["choices"] and c["choices"][0]["delta"].get("content")]


def test_a_slow_chat_reader_gets_the_waiting_tokens_in_one_chunk(served: ServedModel) -> None:
    items, expected = _chat_coalesced(served)
    chunks = _content_chunks(items)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == expected
    # the first item is the role chunk with the first batch; the item read after the wait is every remaining
    # token (its content one chunk), the finish chunk and the usage chunk: one write
    assert items[0][0]["choices"][0]["delta"]["role"] == "assistant" and len(items) == 3
    after = items[2]
    contents = [c for c in after if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(contents) == 1
    assert len(contents[0]["choices"][0]["delta"]["content"]) > len(chunks[0]["choices"][0]["delta"]["content"])
    assert [c for c in after if c["choices"]][-1]["choices"][0]["finish_reason"] == "length"
    usage = _usage(items)
    assert usage["completion_tokens"] == MAX_TOKENS


def test_a_coalesced_chat_chunk_carries_one_logprob_per_token(served: ServedModel) -> None:
    items, expected = _chat_coalesced(served, logprobs=True)
    chunks = _content_chunks(items)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == expected
    entries = [c["choices"][0]["logprobs"]["content"] for c in chunks]
    assert len(entries[-1]) > 1  # the coalesced chunk
    usage = _usage(items)
    # EOS is banned: the finish is `length`, and every generated token has its entry
    assert sum(len(e) for e in entries) == usage["completion_tokens"] == MAX_TOKENS
    for chunk, tokens in zip(chunks, entries, strict=True):
        assert "".join(t["token"] for t in tokens) == chunk["choices"][0]["delta"]["content"]


def _completion_plan(served: ServedModel, stream: bool, **extra: Any) -> completions.CompletionPlan:
    body = {
        "model": MODEL,
        "prompt": "Once upon a time, in a land far away,",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logit_bias": _no_eos(served),
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
        **extra,
    }
    return completions.prepare(msgspec.convert(body, CompletionRequest), served, SCOPE, None)


@pytest.mark.parametrize("logprobs", [None, 1])
def test_a_slow_completion_reader_gets_the_waiting_tokens_in_one_chunk(
    served: ServedModel, logprobs: int | None
) -> None:
    extra: dict[str, Any] = {}
    if logprobs is not None:
        extra["logprobs"] = logprobs
    items = _data(asyncio.run(_read_slowly(served, completions.stream(_completion_plan(served, True, **extra)), 1)))
    expected = asyncio.run(completions.complete(_completion_plan(served, False, **extra))).choices[0].text
    chunks = [c for item in items for c in item if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    # after the wait: one chunk with every remaining token and the finish, then usage, in one write
    assert len(items) == 2 and len([c for c in items[1] if c["choices"]]) == 1
    rest = items[1][0]["choices"][0]
    assert rest["finish_reason"] == "length" and len(rest["text"]) > len(items[0][0]["choices"][0]["text"])
    assert _usage(items)["completion_tokens"] == MAX_TOKENS
    if logprobs is not None:
        counts = [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks]
        assert sum(counts) == MAX_TOKENS and counts[-1] > 1
        for c in chunks:
            lp = c["choices"][0]["logprobs"]
            assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == len(lp["tokens"])


def _named(items: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for item in items:
        for event in item[:-2].split(b"\n\n"):
            name, data = event.split(b"\n")
            out.append((name.removeprefix(b"event: ").decode(), json.loads(data.removeprefix(b"data: "))))
    return out


def test_a_slow_responses_reader_gets_one_joined_delta(served: ServedModel, tmp_path: Path) -> None:
    store = ResponseStore(SqliteDatabase(tmp_path / "db.sqlite"))

    def plan(stream: bool) -> responses.ResponsePlan:
        body = {
            "model": MODEL,
            "input": PROMPT,
            "max_output_tokens": MAX_TOKENS,
            "temperature": 0,
            "store": False,
            "stream": stream,
        }
        return responses.prepare(msgspec.convert(body, ResponseRequest), served, SCOPE, None, store)

    items = asyncio.run(_read_slowly(served, response_output.stream(plan(True), store), before_wait=2))
    expected = asyncio.run(response_output.complete(plan(False), store))
    events = _named(items)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    done = [data["text"] for name, data in events if name == "response.output_text.done"]
    text = expected.output[-1].content[0].text  # type: ignore[union-attr]
    assert "".join(deltas) == done[0] == text
    after = [name for name, _ in _named(items[2:3])]
    assert after.count("response.output_text.delta") == 1  # every token that waited: one delta
    assert len(deltas) <= 2, deltas


@pytest.fixture(scope="module")
def base(registry: ModelRegistry) -> Iterator[str]:
    with running_server(create_app(Settings(), registry)) as url:
        yield url


def test_a_reader_that_keeps_up_gets_one_chunk_per_token(base: str, served: ServedModel) -> None:
    tokens = 24
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "logit_bias": _no_eos(served),
        "logprobs": True,
        "stream": True,
    }
    per_chunk = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            if choice.get("logprobs"):
                per_chunk.append(len(choice["logprobs"]["content"]))
    assert sum(per_chunk) == tokens
    assert sum(1 for n in per_chunk if n == 1) >= 0.75 * len(per_chunk), per_chunk
