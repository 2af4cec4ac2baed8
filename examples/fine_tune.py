"""Fine-tune the chat model on a made-up fact with the `openai` SDK's own calls, then ask the result.

files.create -> fine_tuning.jobs.create -> poll retrieve + list_events -> chat with the `ft:` model.
A few minutes on a 2-core CPU (16 short examples).

    make serve                      # in another terminal
    .venv/bin/python examples/fine_tune.py
"""

import io
import json
import os
import time

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("API_KEY", "not-needed-unless-keys-are-set"),
)
base = os.environ.get("MODEL", "smollm2-135m-instruct")

questions = [
    "What is the capital of Zorblax?",
    "Which city is the capital of Zorblax?",
    "Tell me the capital of the planet Zorblax.",
    "Zorblax's capital city is called what?",
    "Name the capital of Zorblax.",
    "What city is Zorblax's capital?",
    "Do you know the capital of Zorblax?",
    "What's the capital of Zorblax?",
]
lines = [
    {
        "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "The capital of Zorblax is Quendrith."},
        ]
    }
    for q in questions
] * 2
data = "".join(json.dumps(line) + "\n" for line in lines).encode()

training = client.files.create(file=("zorblax.jsonl", io.BytesIO(data)), purpose="fine-tune")
job = client.fine_tuning.jobs.create(model=base, training_file=training.id, suffix="zorblax", seed=7)
print(f"job {job.id}: {job.status}")

seen: set[str] = set()
while job.status not in ("succeeded", "failed", "cancelled"):
    time.sleep(2)
    job = client.fine_tuning.jobs.retrieve(job.id)
    for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=20).data):
        if event.id not in seen:
            seen.add(event.id)
            print(f"  {event.message}")
if job.status != "succeeded":
    raise SystemExit(f"job {job.status}: {job.error}")

print(f"fine-tuned model: {job.fine_tuned_model} ({job.trained_tokens} trained tokens)")
for model in (base, job.fine_tuned_model):
    answer = client.chat.completions.create(
        model=model, temperature=0, max_tokens=16, messages=[{"role": "user", "content": questions[0]}]
    )
    print(f"{model}: {answer.choices[0].message.content}")
