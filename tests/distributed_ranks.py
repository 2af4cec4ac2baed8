"""One rank of tests/test_distributed.py's engine check, started by `mlx.launch` (not collected by pytest).

    mlx.launch --backend ring -n 2 --python PY tests/distributed_ranks.py MODEL_DIR OUT_JSON [SPLIT]

Rank 0 first runs the requests on an unsharded copy of the model (the single-process engine, no collectives),
then on its shard of the model with an Engine whose other ranks follow (`Engine(..., channel=...)`), and
writes both outputs to OUT_JSON. The other ranks load their shard and follow until rank 0 stops them.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import server  # noqa: E402,F401  (OpenBLAS before mlx.core)
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402
from server.engine.config import SchedulerConfig  # noqa: E402
from server.engine.follower import follow  # noqa: E402
from server.engine.step_channel import StepChannel  # noqa: E402
from server.engine.world import join, shard_model  # noqa: E402
from server.models.loading import load_chat_model  # noqa: E402

# a 2048-token prefill chunk: the long prompt's call (~4.5 KB of tokens) takes the channel's second collective
CONFIG = EngineConfig(kv_cache_gb=0.01, block_size=4, scheduler=SchedulerConfig(prefill_chunk=2048))
PROMPTS = [
    [5, 17, 99, 3, 42, 8, 61, 7, 12, 30, 31, 32, 33],
    [5, 17, 99, 3, 42, 8, 61, 7, 1, 2],  # shares two full blocks with the first
    list(range(40, 77)),  # a longer one: prefill in chunks, several blocks
    [9],
]
LONG = [(i * 7919) % 30000 + 1000 for i in range(3000)]  # alone: one 2048-token chunk, a ~6 KB message


def requests(tag: str) -> list[GenerationRequest]:
    """Greedy requests: some together (batched prefill and decode), one with n=2, one continuing a conversation."""
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    out = [
        GenerationRequest(f"{tag}-{i}", prompt, greedy, conversation_key="conv" if i == 0 else None)
        for i, prompt in enumerate(PROMPTS)
    ]
    out.append(
        GenerationRequest(f"{tag}-n2", PROMPTS[1], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=2))
    )
    return out


def run_all(engine: Engine, tag: str) -> dict[str, list[list[int]]]:
    """Every request at once (continuous batching), then the conversation's next turn."""
    results: dict[str, list[list[int]]] = {}

    def one(request: GenerationRequest) -> None:
        events = engine.generate(request, timeout=300)
        tokens: dict[int, list[int]] = {}
        for event in events:
            if event.token_id is not None:
                tokens.setdefault(event.index, []).append(event.token_id)
        results[request.request_id.split("-", 1)[1]] = [tokens[i] for i in sorted(tokens)]

    threads = [threading.Thread(target=one, args=(r,)) for r in requests(tag)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = results["0"][0]
    follow_up = PROMPTS[0] + first + [11, 12, 13]
    one(
        GenerationRequest(
            f"{tag}-turn2",
            follow_up,
            SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
            conversation_key="conv",
        )
    )
    one(GenerationRequest(f"{tag}-long", LONG, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
    return results


def main() -> int:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    split = sys.argv[3] if len(sys.argv) > 3 else "auto"
    world = join("ring")
    model, tokenizer = load_chat_model(model_dir, "float32")
    if world.rank == 0:
        reference_model, _ = load_chat_model(model_dir, "float32")
        reference = Engine(reference_model, tokenizer, CONFIG)
        reference.start()
        single = run_all(reference, "single")
        reference.shutdown()
    shard = shard_model(model, world, split)
    if world.rank != 0:
        follower = follow(model, world)
        assert follower is not None
        blocks = follower.runner.store.num_blocks
        print(f"rank {world.rank}: followed {follower.calls} calls over {blocks} blocks", flush=True)
        return 0
    engine = Engine(model, tokenizer, CONFIG, channel=StepChannel(world.group))
    engine.start()
    sharded = run_all(engine, "sharded")
    stats = engine.stats()
    engine.shutdown()
    out.write_text(
        json.dumps(
            {
                "single": single,
                "sharded": sharded,
                "shard": shard.describe(),
                "blocks": engine.pool.num_blocks,
                "prompt_tokens_reused": stats.prompt_tokens_reused,
                "largest_message": engine.runner.channel.largest,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
