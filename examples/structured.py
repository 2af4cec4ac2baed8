"""Structured output: a JSON schema the server enforces with grammar-constrained decoding.

make serve                      # in another terminal
.venv/bin/python examples/structured.py
"""

import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("BASE_URL", "http://127.0.0.1:8000/v1"), api_key=os.environ.get("API_KEY", "x"))
schema = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
response = client.chat.completions.create(
    model=os.environ.get("MODEL", "smollm2-135m-instruct"),
    messages=[{"role": "user", "content": "Describe Paris as JSON."}],
    response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
    max_tokens=200,
    temperature=0,
)
choice = response.choices[0]
if choice.finish_reason == "length":  # the grammar guarantees valid JSON only when generation completes
    raise SystemExit(f"cut off by max_tokens: {choice.message.content!r}")
print(json.dumps(json.loads(choice.message.content), indent=2))
