"""An agent loop with LangChain's ChatOpenAI calling a Python tool through mlx-dropin.

The first step forces a tool call (`tool_choice` names the tool, which the server
enforces with constrained decoding, so even a small model produces a valid call);
the tool runs here, its result goes back as a ToolMessage, and the model answers.

    make serve                      # in another terminal
    .venv/bin/python examples/langchain_tools.py
"""

import os

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


llm = ChatOpenAI(
    base_url=os.environ.get("BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("API_KEY", "x"),
    model=os.environ.get("MODEL", "smollm2-135m-instruct"),
    temperature=0,
    max_tokens=64,
)

messages = [HumanMessage("What is 12 times 7? Use the multiply tool.")]
first = llm.bind_tools([multiply], tool_choice="multiply").invoke(messages)
messages.append(first)
for call in first.tool_calls:
    result = multiply.invoke(call["args"])
    print(f"tool call: {call['name']}({call['args']}) -> {result}")
    messages.append(ToolMessage(str(result), tool_call_id=call["id"]))
answer = llm.invoke(messages)
print("answer:", answer.content)
