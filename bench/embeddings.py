"""Embeddings: this server's MLX encoder against sentence-transformers (torch CPU) on the same model.

One run, same machine, same model directory (the default all-MiniLM-L6-v2 unless --model DIR):

1. latency: one short input, --requests sequential requests through HTTP (the openai SDK's
   default call, base64) to a server started in this process: p50 / p95 / p99 in ms. The
   reference line is sentence-transformers' `encode([text])` in process (it has no server).
2. throughput: inputs/s for batch sizes --batches (default 1, 32, 256; an input is a sentence of
   12-40 words), through HTTP (one request holding the whole batch) and in process
   (`Encoder.embed_ids` over the batcher's chunking: sorted by length, 32 a call), side by side with
   `SentenceTransformer.encode(batch, batch_size=32)`, and the ratio ours / sentence-transformers.

Torch gets the same thread count as MLX's BLAS (all cores). Warm-up rounds run before every
measurement on both sides.

    .venv/bin/python bench/embeddings.py
    .venv/bin/python bench/embeddings.py --model ~/.cache/mlx-dropin/models/all-minilm-l6-v2 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache_location  # noqa: E402  (bench/: the model cache, found as the server finds it)
import numpy as np  # noqa: E402

import server  # noqa: E402,F401  (loads OpenBLAS before anything imports mlx.core)

WORDS = (
    "model server batch token vector search query document river mountain city music guitar "
    "market revenue budget committee kitten sofa garden rain window coffee train station code "
    "function python list sort file line print cathedral century penguin flour egg"
).split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))).capitalize() + "." for _ in range(n)]


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return statistics.median(s), pick(0.95), pick(0.99)


def rate(fn: Callable[[], object], inputs: int, min_seconds: float, warmup: int = 2) -> float:
    """Inputs per second over repeated calls for at least min_seconds (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 2:
            return calls * inputs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="sentence-transformers directory (default: the cached MiniLM)")
    parser.add_argument("--requests", type=int, default=100, help="sequential single-input HTTP requests")
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum time per throughput cell")
    cache_location.add_cache_dir_argument(parser)
    args = parser.parse_args()

    import openai
    import torch
    from sentence_transformers import SentenceTransformer

    from server.app import create_app
    from server.config import Settings
    from server.model_lifecycle import build_registry, shutdown
    from server.registry import ModelRegistry
    from tests.serving import running_server

    settings = Settings(cache_dir=cache_location.cache_dir(args), data_dir=Path("/tmp/mlx-dropin-bench-data"))
    if args.model is not None:
        from server.config import ModelSpec

        settings = Settings(
            models=(ModelSpec("bench-embed", str(args.model)),),
            default_models=False,
            cache_dir=settings.cache_dir,
            data_dir=settings.data_dir,
        )
    registry = ModelRegistry()
    build_registry(registry, settings)
    assert registry.ready, registry.failure
    served = [m for m in registry.list() if m.kind == "embedding"][0]
    if args.model is None:  # the chat model is not needed here
        for m in registry.list():
            if m.engine is not None:
                m.engine.shutdown()
    encoder, batcher = served.encoder, served.batcher
    torch.set_num_threads(os.cpu_count() or 1)
    reference = SentenceTransformer(str(served.path), device="cpu")

    import mlx.core as mx

    print(
        f"model {served.id} ({served.path}); mlx {mx.__version__} on {mx.default_device()}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )

    try:
        with running_server(create_app(settings, registry)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            short = "What is the capital of France?"
            for _ in range(5):
                client.embeddings.create(model=served.id, input=short)
            http_ms = []
            for _ in range(args.requests):
                t = time.perf_counter()
                client.embeddings.create(model=served.id, input=short)
                http_ms.append((time.perf_counter() - t) * 1000)
            ref_ms = []
            for _ in range(args.requests):
                t = time.perf_counter()
                reference.encode([short], convert_to_numpy=True)
                ref_ms.append((time.perf_counter() - t) * 1000)
            print("\nsingle short input latency (ms)")
            print(f"{'':34} {'p50':>8} {'p95':>8} {'p99':>8}")
            for name, samples in (
                ("ours, HTTP (openai SDK, base64)", http_ms),
                ("sentence-transformers, in process", ref_ms),
            ):
                p50, p95, p99 = percentiles(samples)
                print(f"{name:34} {p50:8.1f} {p95:8.1f} {p99:8.1f}")

            print("\nthroughput (inputs/s)")
            print(f"{'batch':>6} {'ours HTTP':>10} {'ours in-proc':>13} {'s-t':>9} {'HTTP/s-t':>9} {'in-proc/s-t':>12}")
            for size in (int(b) for b in args.batches.split(",")):
                batch = sentences(size, seed=size)
                ids = encoder.tokenize(batch)

                def in_process() -> None:  # what the batcher does: sort by length, then max_batch per call
                    ordered = sorted(ids, key=len)
                    for start in range(0, len(ordered), batcher.max_batch):
                        encoder.embed_ids(ordered[start : start + batcher.max_batch])

                def over_http() -> None:
                    client.embeddings.create(model=served.id, input=batch)

                def theirs() -> None:
                    reference.encode(batch, batch_size=32, convert_to_numpy=True)

                ours_http = rate(over_http, size, args.seconds)
                ours_proc = rate(in_process, size, args.seconds)
                ref = rate(theirs, size, args.seconds)
                print(
                    f"{size:6d} {ours_http:10.1f} {ours_proc:13.1f} {ref:9.1f} {ours_http / ref:9.2f} "
                    f"{ours_proc / ref:12.2f}"
                )

            # Quality cross-check on the benchmark's own inputs.
            batch = sentences(64, seed=1)
            mine = encoder.embed_ids(encoder.tokenize(batch))
            ref_vecs = reference.encode(batch, convert_to_numpy=True)
            cos = (mine * ref_vecs).sum(1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(ref_vecs, axis=1))
            print(f"\nmin cosine ours vs sentence-transformers over 64 inputs: {cos.min():.6f}")
    finally:
        shutdown(registry)
        asyncio.set_event_loop(None)


if __name__ == "__main__":
    main()
