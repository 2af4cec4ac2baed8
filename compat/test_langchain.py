"""LangChain's ChatOpenAI: invoke, stream, batch (it sends max_completion_tokens and stream=false)."""

from __future__ import annotations

import pytest
from langchain_openai import ChatOpenAI


@pytest.fixture(scope="module")
def llm(base_url: str, api_key: str, chat_model: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=base_url, api_key=api_key, model=chat_model, max_tokens=8, max_retries=0,
                      temperature=0)


def test_langchain_invoke(llm: ChatOpenAI) -> None:
    message = llm.invoke("What is the capital of France?")
    assert isinstance(message.content, str) and message.response_metadata.get("finish_reason") in ("stop", "length")
    assert message.usage_metadata and message.usage_metadata["total_tokens"] > 0


def test_langchain_stream(llm: ChatOpenAI) -> None:
    pieces = list(llm.stream("Say hello."))
    assert pieces and isinstance("".join(str(p.content) for p in pieces), str)


def test_langchain_batch(llm: ChatOpenAI) -> None:
    answers = llm.batch(["One word: sky colour?", "One word: grass colour?"])
    assert len(answers) == 2 and all(isinstance(a.content, str) for a in answers)
