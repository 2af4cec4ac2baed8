"""The `serve` command's flags: names, help texts and choices (server/config.py turns them into Settings).

Defaults are not set here: `settings_from_args` applies flag, then MLX_DROPIN_* environment variable,
then the Settings default, so a flag left out can still come from the environment.
"""

from __future__ import annotations

import argparse

from server.config import DISTRIBUTED_BACKENDS, DTYPES, ENGINES, PREFILL_BUCKETS, SPLITS


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` flags; defaults are applied in settings_from_args so env can fill them."""
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="[ID=]SOURCE",
        help="serve a model: a Hugging Face repo id, a local MLX directory or a .gguf file; repeatable",
    )
    parser.add_argument(
        "--no-default-models",
        action="store_true",
        default=None,
        help="do not serve the embedded defaults (smollm2-135m-instruct, all-minilm-l6-v2)",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require this bearer key (repeatable); without any, the server is open",
    )
    parser.add_argument("--cache-dir", help="model cache (default ~/.cache/mlx-dropin)")
    parser.add_argument("--data-dir", help="files, jobs and adapters (default ~/.local/share/mlx-dropin)")
    parser.add_argument(
        "--database-url",
        help="postgresql://user@host/db: state shared by replicas (default: SQLite in the data dir); "
        "prefer the MLX_DROPIN_DATABASE_URL variable for a URL with a password (flags show in ps)",
    )
    parser.add_argument(
        "--fine-tuning-lease-seconds",
        type=float,
        help="with a shared database, a running job whose replica stopped renewing its claim this long "
        "is queued again for another replica (default 30)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weights dtype: auto = float32 on CPU, keep quantized on Metal/CUDA (default auto)",
    )
    parser.add_argument("--max-body-mb", type=float, help="largest request body in MiB (default 32)")
    parser.add_argument("--max-file-mb", type=float, help="largest upload to /v1/files in MiB (default 512)")
    parser.add_argument(
        "--max-storage-gb-per-tenant",
        type=float,
        help="GiB of stored files (/v1/files) each tenant may hold; an upload over it is a 400 "
        "storage_quota_exceeded (default off)",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    parser.add_argument(
        "--offline", action="store_true", default=None, help="never reach the hub; serve only what the cache holds"
    )
    parser.add_argument("--kv-cache-gb", type=float, help="KV block pool size per chat model in GiB (default 2)")
    parser.add_argument(
        "--mlx-cache-gb",
        type=float,
        help="limit of MLX's cache of freed buffers in GiB (default on a GPU: a quarter of the device memory "
        "the weights and KV pools leave spare; on a CPU: MLX's own)",
    )
    parser.add_argument("--block-size", type=int, help="tokens per KV block (default 16)")
    parser.add_argument("--max-num-seqs", type=int, help="sequences decoding together (default 64)")
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        help="prompt tokens computed per engine step while no sequence is decoding "
        "(default 512 on a CPU, 2048 on a GPU)",
    )
    parser.add_argument(
        "--decoding-prefill-chunk",
        type=int,
        help="prompt tokens computed per engine step while streamed sequences are decoding, so "
        "prompts never stall their next token for long (default 64 on a CPU, 2048 on a GPU; "
        "at most --prefill-chunk)",
    )
    parser.add_argument(
        "--exact-cpu-layers",
        action="store_true",
        default=None,
        help="on a CPU, run mlx-lm's own attention and MLP code (MLX's scalar exp: about a third "
        "slower at long contexts) instead of the power-of-two forms",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        help="where each chat model's engine runs: 'process' (a process of its own, away from the HTTP side's "
        "GIL; restarted if it dies) or 'thread' (inside the server process) (default process)",
    )
    parser.add_argument(
        "--prefill-buckets",
        choices=PREFILL_BUCKETS,
        help="pad prefill forwards to a few bucket shapes and run each shape a burst of new prompts can take "
        "before serving, so no request waits while the device builds kernels for a new shape (default auto: "
        "on with CUDA, where each new shape builds a cuDNN attention graph; off elsewhere, where padding "
        "only adds work)",
    )
    parser.add_argument(
        "--distributed-backend",
        choices=DISTRIBUTED_BACKENDS,
        help="under mlx.launch: the mx.distributed backend the ranks join (ring, jaccl, nccl, mpi; default any: "
        "the first that starts); the first chat model is split over the ranks, rank 0 serves HTTP",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        help="under mlx.launch: how the model is split over the ranks: tensor (every layer's heads and MLP "
        "divided, mlx-lm's model.shard), pipeline (runs of whole layers per rank, mlx-lm's model.pipeline) or "
        "auto (default: tensor where the model has it and its heads divide evenly, else pipeline)",
    )
    parser.add_argument(
        "--rank-timeout",
        type=float,
        help="under mlx.launch: seconds one engine step may wait for the other ranks before rank 0 declares a rank "
        "hung, fails its requests (503) and answers /ready with 503 (default 120)",
    )
    parser.add_argument(
        "--queue-timeout", type=float, help="seconds a request waits for KV blocks before a 503 (default 30)"
    )
    parser.add_argument(
        "--max-training-jobs",
        type=int,
        help="fine-tuning jobs training at once, each in its own worker process (default 1)",
    )
    parser.add_argument(
        "--max-loaded-adapters",
        type=int,
        help="fine-tuned models kept loaded; the least recently used idle one is unloaded (default 4)",
    )
    parser.add_argument(
        "--adapter-kv-cache-gb",
        type=float,
        help="KV block pool of each loaded fine-tuned chat model in GiB (default 0.5)",
    )
    parser.add_argument(
        "--sse-keepalive", type=float, help="seconds between keep-alive comments on a quiet stream (default 5)"
    )
    parser.add_argument(
        "--api-keys-file",
        metavar="PATH",
        help="keys with organizations and per-key limits: lines 'KEY [ORG] [rpm=N] [tpm=N] "
        '[max_concurrent=N]\' or JSON {"keys": [...]}',
    )
    parser.add_argument("--rate-limit-rpm", type=int, help="requests per minute per key (default off)")
    parser.add_argument(
        "--rate-limit-tpm",
        type=int,
        help="tokens per minute per key, prompt + max_tokens counted at admission (default off)",
    )
    parser.add_argument(
        "--max-concurrent-per-key", type=int, help="sequences generating at once per key; more is a 429 (default off)"
    )
    parser.add_argument(
        "--request-timeout", type=float, help="seconds a non-streamed generation may take before a 504 (default off)"
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="allow browser calls from this origin, or '*' (repeatable; default off)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        help="seconds in-flight requests may finish after SIGTERM; then they end with "
        "finish_reason 'abort' (default 10)",
    )
    parser.add_argument(
        "--metrics-key",
        metavar="KEY",
        help="require this key (Bearer, api-key or x-api-key header) for GET /metrics; API keys "
        "do not open it (default: /metrics is open)",
    )
