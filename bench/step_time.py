"""Steady-state decode step time: our engine against mlx-lm's BatchGenerator, side by side in one run.

Both sides get B requests of --prompt-len random tokens (greedy, EOS ignored, far more tokens than
are measured), run --warmup steps, then --steps timed steps: ours by calling the engine's step
directly on this thread (no engine thread, no request queue; token events still built, on the
output thread where the engine uses one), mlx-lm's by `BatchGenerator.next_generated()`. Each
figure is the mean milliseconds a step, every request decoding; rounds alternate sides and each
side's best round of --repeat is kept. This isolates the per-step cost (host work, kernel
launches, device time) from admission and prefill, which `engine_vs_mlxlm.py` includes.

    .venv/bin/python bench/step_time.py --batches 1,8                                  # CPU
    python3 bench/step_time.py --shape llama-1b --batches 8,32,128 --repeat 3             # GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache_location  # noqa: E402  (the model cache, found as the server finds it)
import engine_vs_mlxlm as shared  # noqa: E402  (model loading shared with the other engine benchmark)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, SchedulerConfig  # noqa: E402


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(min(100, vocab // 2), vocab, length).tolist() for _ in range(batch)]


def timed(step: Callable[[], Any], warmup: int, steps: int) -> float:
    """Mean milliseconds of `steps` calls after `warmup` calls, the device drained at both ends."""
    for _ in range(warmup):
        step()
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    mx.synchronize()
    return 1e3 * (time.perf_counter() - t0) / steps


def ours(engine: Engine, batch: list[list[int]], warmup: int, steps: int, tag: str) -> float:
    params = SamplingParams(max_tokens=warmup + steps + 64, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(batch):
        # the engine thread's own entry point, called here: this thread is the engine thread
        engine.requests.add(engine.validate(GenerationRequest(f"{tag}-{i}", prompt, params)), lambda event: None)
    while any(s.num_pending_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine._step()
    elapsed = timed(engine._step, warmup, steps)
    engine.requests.abort_everything()
    engine.output.flush()
    return elapsed


def mlxlm(model: Any, batch: list[list[int]], warmup: int, steps: int) -> float:
    from mlx_lm.generate import BatchGenerator

    n = len(batch)
    gen = BatchGenerator(model, max_tokens=warmup + steps + 64, completion_batch_size=max(32, n), prefill_batch_size=8)
    gen.insert(batch, max_tokens=[warmup + steps + 64] * n)
    try:
        seen: set[int] = set()
        while len(seen) < n:  # every request has its first token: prefill is over
            seen.update(r.uid for r in gen.next_generated())
        return timed(gen.next_generated, warmup, steps)
    finally:
        gen.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="an MLX model directory (default: the cached SmolLM2-135M-Instruct)")
    src.add_argument("--shape", choices=sorted(shared.SHAPES), help="random weights in this model's shape")
    src.add_argument("--random-weights", metavar="CONFIG_JSON", help="random weights for this config.json")
    cache_location.add_cache_dir_argument(p)
    p.add_argument("--dtype", default="auto", help="random weights only: auto = bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--exact-cpu-layers", action="store_true", help="on a CPU, our engine runs mlx-lm's modules too")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model, tok, desc = shared.load_models(args)
    shared.materialize_private_arrays(model)
    our_model, layers = shared.engine_model(model, args.exact_cpu_layers)
    shared.materialize_private_arrays(our_model)
    vocab = shared.vocab_size(model)
    batches = [int(b) for b in args.batches.split(",")]
    per_seq = -(-(args.prompt_len + args.warmup + args.steps + 80) // 16)
    engine = Engine(
        our_model,
        tok,
        EngineConfig(
            num_blocks=max(batches) * per_seq + 64, scheduler=SchedulerConfig(max_num_seqs=max(max(batches), 64))
        ),
    )
    print(
        f"mlx {mx.__version__}  device {mx.default_device()}  model {desc}; ours: {layers}; output thread "
        f"{engine.output.threaded}, decode ahead {engine.stepper.run_ahead}"
    )
    print(f"prompt {args.prompt_len}, {args.warmup} warm-up + {args.steps} timed steps, best of {args.repeat}\n")
    header = f"{'batch':>5} | {'ours ms/step':>11} {'mlx-lm':>8} | {'ours tok/s':>10} {'mlx-lm':>8} | {'ours/mlx':>8}"
    print(header)
    print("-" * len(header))
    try:
        for b in batches:
            batch = prompts(b, args.prompt_len, vocab, args.seed + b)
            mine, theirs = [], []
            for rep in range(args.repeat):
                if rep % 2 == 0:
                    mine.append(ours(engine, batch, args.warmup, args.steps, f"b{b}r{rep}"))
                    theirs.append(mlxlm(model, batch, args.warmup, args.steps))
                else:
                    theirs.append(mlxlm(model, batch, args.warmup, args.steps))
                    mine.append(ours(engine, batch, args.warmup, args.steps, f"b{b}r{rep}"))
            a, r = min(mine), min(theirs)
            print(
                f"{b:>5} | {a:>11.2f} {r:>8.2f} | {1e3 * b / a:>10.1f} {1e3 * b / r:>8.1f} | {r / a:>8.2f}", flush=True
            )
    finally:
        engine.output.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
