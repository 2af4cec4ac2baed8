"""chat_template_kwargs, reasoning effort and template refusals through the real app (tiny random models).

A Qwen3 model (real vocabulary and template) shows the template variables arriving: with thinking off
the prompt holds the empty think block, so `usage.prompt_tokens` grows. A Mistral-Nemo template
refuses a conversation whose roles do not alternate: a 400 naming the message, never a 500.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from server.model_lifecycle import load, unload
from server.registry import ModelRegistry, ServedModel
from tests.chat_template_cases import templates_dir_available
from tests.real_vocab import QWEN3_ADDED, tiny_model_dir
from tests.serving import running_server

pytestmark = pytest.mark.skipif(
    not templates_dir_available(), reason="llama-cpp-python's sdist (real chat templates) could not be fetched"
)
ASK = [{"role": "user", "content": "Hello there."}]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root: Path = tmp_path_factory.mktemp("template-http")
    registry = ModelRegistry()
    qwen3 = tiny_model_dir(
        root / "qwen3",
        vocab="qwen2",
        template="Qwen-Qwen3-0.6B",
        model_type="qwen3",
        eos_token="<|im_end|>",
        added=QWEN3_ADDED,
    )
    nemo = tiny_model_dir(
        root / "nemo", vocab="gpt-2", template="mistralai-Mistral-Nemo-Instruct-2407", model_type="llama"
    )
    registry.add(ServedModel(id="qwen3", kind="chat", path=qwen3))
    registry.add(ServedModel(id="nemo", kind="chat", path=nemo))
    settings = Settings(cache_dir=root / "cache", data_dir=root / "data", kv_cache_gb=0.05)
    load(registry, settings)
    registry.mark_ready()
    with running_server(create_app(settings, registry)) as url:
        yield url
    for served in registry.list():
        unload(served)


def post(base: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(base + "/v1" + path, json=body, timeout=120)


def prompt_tokens(base: str, **extra: Any) -> int:
    r = post(base, "/chat/completions", {"model": "qwen3", "messages": ASK, "max_tokens": 1, **extra})
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens"])


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error  # type: ignore[no-any-return]


def test_chat_template_kwargs_and_reasoning_effort_reach_the_template(base: str) -> None:
    thinking = prompt_tokens(base)
    assert prompt_tokens(base, chat_template_kwargs={"enable_thinking": False}) > thinking
    assert prompt_tokens(base, reasoning_effort="none") > thinking
    assert prompt_tokens(base, reasoning_effort="high") == thinking


def test_responses_reasoning_effort_reaches_the_template(base: str) -> None:
    def usage(**extra: Any) -> dict[str, Any]:
        r = post(base, "/responses", {"model": "qwen3", "input": "Hello there.", "max_output_tokens": 1, **extra})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    plain, off = usage(), usage(reasoning={"effort": "none"})
    assert off["usage"]["input_tokens"] > plain["usage"]["input_tokens"]
    assert off["reasoning"]["effort"] == "none"
    assert (
        usage(chat_template_kwargs={"enable_thinking": False})["usage"]["input_tokens"] == off["usage"]["input_tokens"]
    )


def test_bad_template_inputs_are_400s(base: str) -> None:
    reserved = {"model": "qwen3", "messages": ASK, "chat_template_kwargs": {"add_generation_prompt": False}}
    assert error_of(post(base, "/chat/completions", reserved))["param"] == "chat_template_kwargs"
    effort = {"model": "qwen3", "messages": ASK, "reasoning_effort": "extreme"}
    assert error_of(post(base, "/chat/completions", effort))["param"] == "reasoning_effort"
    effort = {"model": "qwen3", "input": "hi", "reasoning": {"effort": "extreme"}}
    assert error_of(post(base, "/responses", effort))["param"] == "reasoning.effort"


def test_a_conversation_the_template_refuses_is_a_400_naming_the_message(base: str) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for stream in (False, True):
        r = post(base, "/chat/completions", {"model": "nemo", "messages": messages, "max_tokens": 1, "stream": stream})
        error = error_of(r)
        assert error["param"] == "messages[1]" and "alternate" in error["message"]
