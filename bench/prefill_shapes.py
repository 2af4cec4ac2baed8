"""Time to first token when a prefill's shape is new against when the engine has run it before, side by side.

Why: under a burst, the server hands the engine requests as it admits them, so the engine's prefill
steps take shapes (rows x tokens) that no warm-up ran, where the engine alone (bench/server_streams.py)
gets every request at once in the shapes its warm-up round already ran. If a first-seen shape costs a
step much more on a device (kernels built or tuned per shape), that is part of the server's TTFT under
a burst, and padding prefills to a few bucketed shapes run at start-up would remove it.

For each case the engine (in this process, built as the engine process builds it) gets a burst of
requests whose prompt lengths it has not seen, then the same lengths again with other tokens; each
burst's time to the last first token is recorded. Greedy, 2 tokens per request, nothing else running.
Prints both times and the ratio new / repeated per case (about 1x: shapes cost nothing on first use).

    .venv/bin/python bench/prefill_shapes.py --shape smollm2-135m                                     # CPU
    python3 bench/prefill_shapes.py --shape llama-1b --tokenizer-dir TOK --cache-dir /tmp/mc         # GPU
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache_location  # noqa: E402  (the model cache, found as the server finds it)
import random_model  # noqa: E402

import server  # noqa: E402,F401  (loads OpenBLAS before mlx.core)
from server.engine import Engine, GenerationRequest, SamplingParams, TokenEvent  # noqa: E402
from server.gc_heap import freeze_start_up_heap  # noqa: E402

# (label, prompt lengths of one burst); every case's lengths are new to the engine when it first runs
CASES = [
    ("1 request, 41 tokens", [41]),
    ("1 request, 53 tokens", [53]),
    ("1 request, 90 tokens", [90]),
    ("1 request, 130 tokens", [130]),
    ("4 requests, 57-60 tokens", [57, 58, 59, 60]),
    ("16 requests, 44-48 tokens", [44 + i % 5 for i in range(16)]),
    ("16 requests, 61-65 tokens", [61 + i % 5 for i in range(16)]),
    ("48 requests, 70-74 tokens", [70 + i % 5 for i in range(48)]),
]


class Bursts:
    """Submits bursts of requests with fresh prompt tokens and times them."""

    def __init__(self, engine: Engine, vocab: int) -> None:
        self.engine = engine
        self.vocab = vocab
        self.count = 0
        self.params = SamplingParams(max_tokens=2, temperature=0.0)

    def run(self, lengths: list[int]) -> float:
        """Seconds from submitting `lengths` prompts at once to the last request's first token."""
        done = threading.Event()
        left = [len(lengths)]
        last_first = [0.0]

        def sink(events: list[TokenEvent]) -> None:
            for event in events:
                if event.token_id is not None and event.completion_tokens == 1:
                    last_first[0] = max(last_first[0], time.perf_counter())
                if event.finish_reason is not None:
                    if event.finish_reason not in ("stop", "length"):
                        raise RuntimeError(f"request failed: {event.error}")
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        start = time.perf_counter()
        for n in lengths:
            self.count += 1
            first = 1000 + (self.count * 7919) % (self.vocab - 2000)  # a prompt no earlier one shares
            prompt = [(first + 13 * i) % self.vocab for i in range(n)]
            self.engine.submit(GenerationRequest(f"burst-{self.count}", prompt, self.params), sink)
        if not done.wait(300):
            raise RuntimeError("a burst did not finish within 5 minutes")
        return last_first[0] - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=random_model.SHAPES, default="smollm2-135m", help="random weights in this shape")
    p.add_argument("--tokenizer-dir", help="SmolLM2's tokenizer files and config.json (default: the cached model)")
    p.add_argument("--dtype", default="auto", help="auto = bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--kv-cache-gb", type=float, default=2.0)
    cache_location.add_cache_dir_argument(p)
    args = p.parse_args()

    import mlx.core as mx

    from server.config import parse_settings
    from server.models.loading import load_chat_model

    cache = cache_location.cache_dir(args)
    tokenizer_dir = (
        Path(args.tokenizer_dir)
        if args.tokenizer_dir
        else cache_location.default_model_dir("smollm2-135m-instruct", cache)
    )
    model_dir = random_model.save_model_dir(args.shape, args.dtype, tokenizer_dir, cache / "bench")
    settings = parse_settings(
        ["--no-default-models", "--model", f"bench={model_dir}", "--kv-cache-gb", str(args.kv_cache_gb)], {}
    )
    model, tokenizer = load_chat_model(model_dir, settings.dtype)
    if not settings.exact_cpu_layers:
        from server.models.cpu_layers import speed_up_for_cpu

        speed_up_for_cpu(model)
    engine = Engine(model, tokenizer, settings.engine_config())
    freeze_start_up_heap("prefill_shapes")
    engine.start()
    bursts = Bursts(engine, engine.vocab_size)
    try:
        bursts.run([37])  # the process's first forward: allocations, library start-up
        bursts.run([37])
        version = getattr(mx, "__version__", "?")
        print(f"{args.shape} on {mx.default_device()} (MLX {version}); ms to the burst's last first token")
        print(f"{'case':<28} {'new shape':>10} {'repeated':>10} {'new / repeated':>15}")
        for label, lengths in CASES:
            new = bursts.run(lengths)
            again = bursts.run(lengths)
            print(f"{label:<28} {new * 1e3:>10.1f} {again * 1e3:>10.1f} {new / again:>14.2f}x", flush=True)
    finally:
        engine.shutdown()
    from server.exit_order import exit_code, mlx_threads_alive

    return exit_code(0, mlx_threads_alive())  # on a GPU the process ends without finalization (exit_order.py)


if __name__ == "__main__":
    raise SystemExit(main())
