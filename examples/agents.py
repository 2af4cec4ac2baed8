"""Several agents talk to the server at once, each keeping its own conversation id.

Each turn re-sends the whole history (as agent frameworks do); the server keeps
every conversation's KV blocks, so a turn only prefills what is new and the
time to first token stays flat as conversations grow. Prints per-turn TTFT and
the cached prompt tokens the server reports.

    make serve                      # in another terminal
    .venv/bin/python examples/agents.py --agents 4 --turns 5
"""

import argparse
import asyncio
import os
import time

from openai import AsyncOpenAI

SYSTEM = (
    "You are a concise assistant in a team of research agents. Answer in one or two sentences, "
    "stay on topic, and build on what was said before."
)
TOPICS = ["rivers", "volcanoes", "bees", "glaciers", "deserts", "comets", "forests", "tides"]


async def agent(client: AsyncOpenAI, model: str, index: int, turns: int, rows: list[tuple]) -> None:
    topic = TOPICS[index % len(TOPICS)]
    history = [{"role": "system", "content": SYSTEM}]
    for turn in range(turns):
        history.append({"role": "user", "content": f"Tell me one more fact about {topic} (fact {turn + 1})."})
        started = time.perf_counter()
        ttft = None
        text = ""
        usage = None
        stream = await client.chat.completions.create(
            model=model,
            messages=history,
            max_tokens=32,
            temperature=0.7,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Conversation-Id": f"agent-{index}"},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - started
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        history.append({"role": "assistant", "content": text})
        cached = usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0
        rows.append((index, turn + 1, usage.prompt_tokens if usage else 0, cached, ttft or 0.0))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--base-url", default=os.environ.get("BASE_URL", "http://127.0.0.1:8000/v1"))
    parser.add_argument("--model", default=os.environ.get("MODEL", "smollm2-135m-instruct"))
    args = parser.parse_args()
    client = AsyncOpenAI(base_url=args.base_url, api_key=os.environ.get("API_KEY", "x"))
    rows: list[tuple] = []
    started = time.perf_counter()
    await asyncio.gather(*(agent(client, args.model, i, args.turns, rows) for i in range(args.agents)))
    print(f"{'agent':>5} {'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT ms':>8}")
    for index, turn, prompt, cached, ttft in sorted(rows):
        print(f"{index:>5} {turn:>4} {prompt:>7} {cached:>7} {ttft * 1000:>8.0f}")
    for turn in range(1, args.turns + 1):
        ttfts = sorted(r[4] for r in rows if r[1] == turn)
        print(f"turn {turn}: median TTFT {ttfts[len(ttfts) // 2] * 1000:.0f} ms")
    print(f"total wall time {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    asyncio.run(main())
