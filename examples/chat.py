"""Chat with a running mlx-dropin server through the official `openai` SDK: one answer, then a stream.

make serve                      # in another terminal
.venv/bin/python examples/chat.py
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("API_KEY", "not-needed-unless-keys-are-set"),
)
model = os.environ.get("MODEL", "smollm2-135m-instruct")

answer = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=32
)
print(answer.choices[0].message.content)
print(f"usage: {answer.usage}")

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write a two-line poem about the sea."}],
    max_tokens=48,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    elif chunk.usage:
        print(f"\nusage: {chunk.usage.prompt_tokens} prompt, {chunk.usage.completion_tokens} completion")
