"""Chat and legacy completions through the `openai` SDK and raw HTTP, against the real default model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import openai
import pytest

from server.app import create_app
from server.config import Settings
from server.registry import ModelRegistry
from tests.serving import running_server

MODEL = "smollm2-135m-instruct"
USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base(registry: ModelRegistry) -> Iterator[str]:
    with running_server(create_app(replace(Settings(), api_keys=("sk-a", "sk-b"), max_body_mb=1), registry)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="sk-a", max_retries=0)


def raw(base: str, path: str, body: object, key: str = "sk-a", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        base + "/v1" + path, json=body, headers={"authorization": f"Bearer {key}", **(headers or {})}, timeout=120
    )


def test_chat_completion_shape(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.system_fingerprint and r.created > 0
    choice = r.choices[0]
    assert choice.message.role == "assistant" and "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    usage = r.usage
    assert usage and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens is not None
    assert usage.completion_tokens_details and usage.completion_tokens_details.reasoning_tokens == 0


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_completion_tokens=5,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "length" and r.usage and r.usage.completion_tokens == 5


def test_stream_matches_non_stream_and_ends_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_framing(base: str) -> None:
    with httpx.stream(
        "POST",
        base + "/v1/chat/completions",
        timeout=60,
        headers={"authorization": "Bearer sk-a", "accept": "application/json"},
        json={"messages": USER, "max_tokens": 4, "stream": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    for payload in data[:-1]:
        assert json.loads(payload)["object"] == "chat.completion.chunk"


def test_n_choices_and_stop(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, n=2, temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    stopped = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0, stop=["Paris"])
    assert "Paris" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) <= 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and entry.bytes is not None
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    assert "".join(e.token for e in content) in (r.choices[0].message.content or "") + ""


def test_seed_reproducible(client: openai.OpenAI) -> None:
    a, b = (
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=1.0, seed=42)
        for _ in range(2)
    )
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "temperature": 7}, "temperature"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({"messages": USER, "logit_bias": {"999999999": 5}}, "logit_bias"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_param(base: str, body: dict, param: str) -> None:
    response = raw(base, "/chat/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_text_parts_and_developer_role_and_explicit_nulls(client: openai.OpenAI, base: str) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=4,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]},
        ],
    )
    assert r.choices[0].message.content is not None
    response = raw(
        base,
        "/chat/completions",
        {
            "messages": USER,
            "max_tokens": 2,
            "seed": None,
            "stream": False,
            "store": True,
            "metadata": {"a": "b"},
            "unknown_field": 1,
        },
    )
    assert response.status_code == 200


def test_malformed_json_is_400(base: str) -> None:
    response = httpx.post(
        base + "/v1/chat/completions",
        content=b'{"messages": [',
        timeout=30,
        headers={"authorization": "Bearer sk-a", "content-type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_chunked_body_over_limit_is_413(base: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"z" * 100_000
        yield b'"}]}'

    response = httpx.post(base + "/v1/chat/completions", content=chunks(), headers={"authorization": "Bearer sk-a"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_unknown_and_wrong_kind_models(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="all-minilm-l6-v2", messages=USER)
    assert info.value.code == "model_not_supported"


def test_context_overflow_is_400_with_numbers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=9000)
    assert info.value.code == "context_length_exceeded"
    assert "context_length_exceeded" in str(info.value) and "8192" in str(info.value)


def test_conversation_key_reuses_previous_turn(client: openai.OpenAI) -> None:
    history = [{"role": "user", "content": "My name is Ada. Please remember it."}]
    first = client.chat.completions.create(
        model=MODEL, messages=history, max_tokens=8, temperature=0, prompt_cache_key="conv-ada"
    )
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "What is my name?"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=history, max_tokens=6, temperature=0, prompt_cache_key="conv-ada"
    )
    assert second.usage and first.usage
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens  # type: ignore[union-attr]


def test_conversation_header_and_tenant_isolation(base: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "A rather specific question about tenant isolation?"}],
        "max_tokens": 3,
        "temperature": 0,
    }
    first = raw(base, "/chat/completions", body, headers={"x-conversation-id": "shared-id"})
    again = raw(base, "/chat/completions", body, headers={"x-conversation-id": "shared-id"})
    other = raw(base, "/chat/completions", body, key="sk-b", headers={"x-conversation-id": "shared-id"})
    cached = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (first, again, other)]
    prompt_tokens = first.json()["usage"]["prompt_tokens"]
    assert cached[1] == prompt_tokens - 1  # everything but the last prompt token is reused
    assert cached[2] == 0  # another key never reads this tenant's KV, even with the same conversation id


def test_disconnect_cancels_and_frees_blocks(base: str, registry: ModelRegistry) -> None:
    engine = registry.get(MODEL).engine
    baseline = engine.pool.num_used
    body = {
        "messages": [{"role": "user", "content": "Write a very long essay about rivers."}],
        "max_tokens": 400,
        "stream": True,
    }
    with httpx.stream(
        "POST", base + "/v1/chat/completions", json=body, timeout=60, headers={"authorization": "Bearer sk-a"}
    ) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 6:
                break
    deadline = time.monotonic() + 10
    while (engine.pool.num_used > baseline or engine.scheduler.has_work) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.pool.num_used <= baseline and not engine.scheduler.running
    engine.check_integrity()


# -- legacy completions ---------------------------------------------------------------------------
def test_completion_string_prompt(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage and r.usage.completion_tokens <= 5


def test_completion_many_prompts_flat_indexes(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt=["One, two,", [504, 3458, 314]], max_tokens=3, n=2, temperature=1.0, seed=5
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]


def test_completion_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0)
    assert r.usage and r.usage.completion_tokens <= 16


def test_completion_echo_and_logprobs(client: openai.OpenAI) -> None:
    echoed = client.completions.create(model=MODEL, prompt="Hello, my name", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Hello, my name")
    r = client.completions.create(model=MODEL, prompt="Hello, my name", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(t) >= 2 for t in lp.top_logprobs)  # type: ignore[arg-type]
    assert "".join(lp.tokens) == r.choices[0].text


def test_completion_best_of_keeps_the_most_likely(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=4, n=1, best_of=3, temperature=1.0, seed=9
    )
    assert len(r.choices) == 1
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", best_of=1, n=2)


def test_completion_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="The capital of France is",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].usage and chunks[-1].choices == []
    assert "".join(c.choices[0].text for c in chunks if c.choices)


@pytest.mark.parametrize("prompt", [None, [], [[]], [1.5], {"a": 1}])
def test_completion_bad_prompts_are_400(base: str, prompt: object) -> None:
    response = raw(base, "/completions", {"prompt": prompt, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_edited_history_reuses_exactly_the_common_prefix(client: openai.OpenAI, registry: ModelRegistry) -> None:
    tokenizer = registry.get(MODEL).tokenizer
    turn1 = [{"role": "user", "content": "List three colours of the rainbow, please."}]
    first = client.chat.completions.create(
        model=MODEL, messages=turn1, max_tokens=6, temperature=0, prompt_cache_key="edit-me"
    )
    edited = [{"role": "user", "content": "List three animals of the savanna, please."}]
    second = client.chat.completions.create(
        model=MODEL, messages=edited, max_tokens=2, temperature=0, prompt_cache_key="edit-me"
    )
    ids1 = list(tokenizer.apply_chat_template(turn1, add_generation_prompt=True))
    ids2 = list(tokenizer.apply_chat_template(edited, add_generation_prompt=True))
    common = next(i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b)
    assert first.usage and second.usage
    assert second.usage.prompt_tokens_details.cached_tokens == common  # type: ignore[union-attr]


def test_forced_tool_call_and_tool_choice_errors(client: openai.OpenAI, base: str) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Add two integers",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"],
                },
            },
        }
    ]
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=64,
        temperature=0,  # sampled integers may run past the token budget and cut the call (a flake)
        tools=tools,
        tool_choice="required",
        messages=[{"role": "user", "content": "Add 2 and 3."}],
    )
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
    assert set(json.loads(call.function.arguments)) == {"a", "b"}
    bad = raw(
        base,
        "/chat/completions",
        {"messages": USER, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"
    bad = raw(base, "/chat/completions", {"messages": USER, "tool_choice": "required"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


def test_unsupported_schema_is_400_naming_the_keyword(base: str) -> None:
    schema = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    response = raw(
        base,
        "/chat/completions",
        {
            "messages": USER,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}},
        },
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    assert "uniqueItems" in response.json()["error"]["message"]
    response = raw(base, "/chat/completions", {"messages": USER, "response_format": {"type": "yaml"}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_keepalive_comments_during_a_long_prefill(registry: ModelRegistry) -> None:
    settings = replace(Settings(), sse_keepalive=0.05)
    long_prompt = "Here is a long document about the history of bridges. " * 60
    with running_server(create_app(settings, registry)) as url:
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            timeout=120,
            json={"messages": [{"role": "user", "content": long_prompt}], "max_tokens": 2, "stream": True},
        ) as response:
            lines = [line for line in response.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:") and '"content":""' not in line)
    assert any(line.startswith(":") for line in lines[:first_data]), lines[:5]


def test_h2c_prior_knowledge(registry: ModelRegistry) -> None:
    with running_server(create_app(Settings(), registry)) as url:
        with httpx.Client(http1=False, http2=True) as h2:
            response = h2.get(url + "/v1/models")
    assert response.status_code == 200 and response.http_version == "HTTP/2"


def test_completion_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI) -> None:
    prompt = "The capital of France is Paris"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp and r.choices[0].text.startswith(prompt)
    n_prompt = (
        len(
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=0)
            .choices[0]
            .logprobs.tokens
        )
        - 1
    )  # type: ignore[union-attr]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # type: ignore[index]
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])  # type: ignore[index]
    assert "".join(lp.tokens[:n_prompt]) == prompt  # type: ignore[index]
    # " Paris" after "The capital of France is" is likely under the model: among the top alternatives
    paris = lp.tokens.index(" Paris")  # type: ignore[union-attr]
    assert lp.token_logprobs[paris] > -3  # type: ignore[index,operator]


def test_suffix_without_fill_in_the_middle_tokens_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="def add(a, b):", suffix="    return c", max_tokens=4)
    assert info.value.param == "suffix"


def test_the_engine_learns_which_requests_stream(
    client: openai.OpenAI, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stream` reaches the engine (GenerationRequest.streamed): the scheduler holds prompts to the small
    decoding budget only for the sake of streamed sequences."""
    engine = registry.get(MODEL).engine
    seen: list[tuple[str, bool]] = []
    submit = engine.submit

    def recording(request, sink):  # type: ignore[no-untyped-def]
        seen.append((request.request_id.split("-")[0], request.streamed))
        submit(request, sink)

    monkeypatch.setattr(engine, "submit", recording)
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1, stream=True))
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, stream=True))
    client.responses.create(model=MODEL, input="Hi", max_output_tokens=16)
    assert seen == [("chat", False), ("chat", True), ("cmpl", False), ("cmpl", True), ("resp", False)]
