"""The engine alone, for bench/server_streams.py: run as a subprocess of its own, it measures the work the clients send.

It builds the engine as the server's engine process does (`server.config.parse_settings` on the same
pass-through server flags, `load_chat_model`, the CPU layers unless --exact-cpu-layers,
`Settings.engine_config()`, the start-up heap frozen out of garbage collection),
then for each round in the job file submits every request (prompt token ids rendered with the chat
template, greedy, max_tokens, the same logit_bias) at one moment and records, per request, the time
of each token event and the completion tokens: the same `Stream` records the HTTP clients produce.

    python bench/stream_engine_side.py JOB.json OUT.json     (JOB: {"model_dir", "server_args", "rounds"})
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stream_clients import Stream  # noqa: E402

import server  # noqa: E402,F401  (loads OpenBLAS before mlx.core)
from server.engine import Engine, GenerationRequest, SamplingParams, TokenEvent  # noqa: E402
from server.engine.memory_limits import apply_memory_limits  # noqa: E402
from server.gc_heap import freeze_start_up_heap  # noqa: E402


def build_engine(model_dir: str, server_args: list[str]) -> Engine:
    """The engine `python -m server serve --model bench=DIR <server_args>` would run."""
    from server.config import parse_settings
    from server.models.loading import load_chat_model

    settings = parse_settings(["--no-default-models", "--model", f"bench={model_dir}", *server_args])
    model, tokenizer = load_chat_model(Path(model_dir), settings.dtype)
    if not settings.exact_cpu_layers:
        from server.models.cpu_layers import speed_up_for_cpu

        speed_up_for_cpu(model)
    engine = Engine(model, tokenizer, settings.engine_config())
    # MLX's memory and cache limits as the server's engine process sets them (without them the engine alone
    # held 76.4 GiB of an H100, mostly MLX's cache, where ours peaked at 41.7 GiB)
    apply_memory_limits(settings.mlx_cache_gb)
    freeze_start_up_heap("engine alone")  # as the engine-core process does once its engine is built
    engine.start()
    return engine


def run_round(engine: Engine, tag: str, prompts: list[list[int]], params: SamplingParams) -> list[Stream]:
    """Submit every prompt at once; one Stream per request (a token event is a chunk of one token)."""
    n = len(prompts)
    done = threading.Event()
    remaining = [n]
    start = time.perf_counter()
    records = [Stream(start, prompt_tokens=len(p)) for p in prompts]

    def sink_for(record: Stream) -> Any:
        def sink(events: list[TokenEvent]) -> None:  # one step's events of this request
            now = time.perf_counter()
            for event in events:
                if event.token_id is not None:
                    record.chunk_times.append(now)
                    record.completion_tokens += 1
                if event.finish_reason is not None:
                    if event.finish_reason not in ("length", "stop"):
                        record.error = f"{event.finish_reason}: {event.error}"
                    remaining[0] -= 1
                    if not remaining[0]:
                        done.set()

        return sink

    for i, prompt in enumerate(prompts):
        engine.submit(GenerationRequest(f"{tag}-{i}", prompt, params), sink_for(records[i]))
    if not done.wait(timeout=3600):
        raise RuntimeError("the engine did not finish a round within an hour")
    return records


def main(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    engine = build_engine(job["model_dir"], job["server_args"])
    results = []
    try:
        for number, spec in enumerate(job["rounds"]):
            params = SamplingParams(
                max_tokens=spec["max_tokens"],
                temperature=0.0,
                logit_bias={int(k): float(v) for k, v in spec["logit_bias"].items()},
            )
            records = run_round(engine, f"r{number}", spec["prompts"], params)
            results.append([asdict(r) for r in records])
            print(f"  engine round {number} ({spec['label']}) done", file=sys.stderr, flush=True)
    finally:
        engine.shutdown()
    Path(out_path).write_text(json.dumps(results))
    # MLX's CUDA build can abort in the interpreter's finalization even after an orderly stop (see
    # server/exit_order.py): the results are written, so end here
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
