"""SSE bytes: a chunk built from the pre-encoded envelope (`ChunkFrame`) is byte for byte the event of the
whole chunk encoded at once, whatever the envelope's strings hold; `data_event` and `named_event` frame one
payload each."""

from __future__ import annotations

import json

import msgspec
import pytest

from server.wire.chat import ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, Delta, TokenLogprob, TopLogprob
from server.wire.codec import encode
from server.wire.completions import Completion, CompletionChoice, CompletionLogprobs
from server.wire.sse import DONE, ChunkFrame, data_event, named_event

TRICKY = [
    "plain-model",
    'quoted "model" name',
    'a model called "choices":[]',
    '"choices":[]',
    'choices\\":[]',
    "ünïcødé ✓ 模型 🙂",
    "line\nbreak\tand\\backslash",
]

CHAT_CHOICES: list[list[ChunkChoice]] = [
    [],
    [ChunkChoice(index=0, delta=Delta(role="assistant", content=""))],
    [ChunkChoice(index=0, delta=Delta(content='say "choices":[] ✓\n'))],
    [
        ChunkChoice(
            index=1,
            delta=Delta(content="Hi"),
            logprobs=ChoiceLogprobs(content=[TokenLogprob("Hi", -0.5, [72, 105], [TopLogprob("Hi", -0.5, None)])]),
        ),
        ChunkChoice(index=2, delta=Delta(), finish_reason="stop"),
    ],
]

COMPLETION_CHOICES: list[list[CompletionChoice]] = [
    [],
    [CompletionChoice(index=0, text="", finish_reason=None)],
    [CompletionChoice(index=3, text='"choices":[] 🙂', finish_reason="length")],
    [
        CompletionChoice(
            index=0,
            text=" Paris",
            finish_reason=None,
            logprobs=CompletionLogprobs([" Paris"], [-0.1], [{" Paris": -0.1}], [0]),
        ),
        CompletionChoice(index=1, text="", finish_reason="stop"),
    ],
]


def _chat(model: str, choices: list[ChunkChoice]) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=f"chatcmpl-{model}", created=1, model=model, choices=choices, system_fingerprint=model
    )


def _completion(model: str, choices: list[CompletionChoice]) -> Completion:
    return Completion(id=f'cmpl-"{model}"', created=2, model=model, choices=choices, system_fingerprint="fp")


@pytest.mark.parametrize("model", TRICKY)
def test_chat_chunk_frame_is_the_whole_chunk_encoded(model: str) -> None:
    frame = ChunkFrame(_chat(model, []))
    for choices in CHAT_CHOICES:
        event = frame.event(choices)
        assert event == b"data: " + encode(_chat(model, choices)) + b"\n\n"
        decoded = json.loads(event.removeprefix(b"data: ").removesuffix(b"\n\n"))
        assert decoded["model"] == model and len(decoded["choices"]) == len(choices)


@pytest.mark.parametrize("model", TRICKY)
def test_completion_chunk_frame_is_the_whole_chunk_encoded(model: str) -> None:
    frame = ChunkFrame(_completion(model, []))
    for choices in COMPLETION_CHOICES:
        event = frame.event(choices)
        assert event == b"data: " + encode(_completion(model, choices)) + b"\n\n"
        assert msgspec.json.decode(event[6:-2], type=Completion) == _completion(model, choices)


def test_a_frame_is_reusable_and_independent_of_earlier_events() -> None:
    frame = ChunkFrame(_chat("m", []))
    first = frame.event(CHAT_CHOICES[2])
    frame.event(CHAT_CHOICES[3])
    assert frame.event(CHAT_CHOICES[2]) == first


def test_data_and_named_events() -> None:
    assert data_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert named_event("response.output_text.delta", b'{"delta":"x"}') == (
        b'event: response.output_text.delta\ndata: {"delta":"x"}\n\n'
    )
    assert DONE == b"data: [DONE]\n\n"
