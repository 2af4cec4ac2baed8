"""LangChain's ChatOpenAI: invoke, stream, batch (it sends max_completion_tokens and stream=false)."""

from __future__ import annotations

import pytest
from langchain_openai import ChatOpenAI


@pytest.fixture(scope="module")
def llm(base_url: str, api_key: str, chat_model: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=base_url, api_key=api_key, model=chat_model, max_tokens=8, max_retries=0, temperature=0)


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


def test_langchain_bind_tools_round_trip(base_url: str, api_key: str, chat_model: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    llm = ChatOpenAI(base_url=base_url, api_key=api_key, model=chat_model, max_tokens=64, max_retries=0, temperature=0)
    messages = [HumanMessage("What is 6 times 7? Use the multiply tool.")]
    first = llm.bind_tools([multiply], tool_choice="multiply").invoke(messages)
    assert first.tool_calls and first.tool_calls[0]["name"] == "multiply"
    assert first.response_metadata.get("finish_reason") == "tool_calls"
    args = first.tool_calls[0]["args"]
    assert set(args) == {"a", "b"}
    messages += [first, ToolMessage(str(multiply.invoke(args)), tool_call_id=first.tool_calls[0]["id"])]
    answer = llm.invoke(messages)
    assert isinstance(answer.content, str)


def test_langchain_streamed_tool_call(base_url: str, api_key: str, chat_model: str) -> None:
    from langchain_core.tools import tool

    @tool
    def lookup(city: str) -> str:
        """Look up facts about a city."""
        return city

    llm = ChatOpenAI(base_url=base_url, api_key=api_key, model=chat_model, max_tokens=96, max_retries=0, temperature=0)
    merged = None
    for piece in llm.bind_tools([lookup], tool_choice="required").stream("Tell me about Paris."):
        merged = piece if merged is None else merged + piece
    assert merged is not None and merged.tool_calls and merged.tool_calls[0]["name"] == "lookup"
    assert "<tool_call>" not in str(merged.content)


def test_langchain_with_structured_output(base_url: str, api_key: str, chat_model: str) -> None:
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=30)
        country: str = Field(max_length=30)

    llm = ChatOpenAI(base_url=base_url, api_key=api_key, model=chat_model, max_tokens=60, max_retries=0, temperature=0)
    result = llm.with_structured_output(City).invoke("Name a city in France.")
    assert isinstance(result, City) and result.name
