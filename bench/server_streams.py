"""N concurrent streaming chat clients against this server, this engine alone and mlx_lm.server, in one run.

The issue #17 benchmark. A model directory of random weights in a real shape (--shape llama-1b or
smollm2-135m; bench/random_model.py) with the default SmolLM2 tokenizer is built once under the model
cache and loaded by every side with `--model DIR`. Sides, one after the other (--sides):
  ours    `python -m server serve --no-default-models --model bench=DIR` (+ --server-arg flags): the
          engine in a process of its own (`--engine process`, the default)
  thread  the same server with `--engine thread`: the engine on a thread of the HTTP process
  engine  this engine alone in a subprocess of its own (bench/stream_engine_side.py), built from the
          same server flags, fed the same prompts as token ids (the chat template rendered here)
  mlxlm   `mlx_lm.server --model DIR` (+ --mlxlm-arg flags); dropped connections are retried, the
          time counted
  split   our server over --ranks ranks: `mlx.launch --backend ring -n RANKS -- mlx-dropin serve ...`, the
          model split over them (tensor parallel; issue #18)
For every N in --streams, each side gets a warm-up round (N requests, --warmup-tokens tokens, other
prompts) and then the measured round: N streaming `/v1/chat/completions` requests (greedy, max_tokens
= --gen-tokens, every EOS id banned with logit_bias -100, stream_options.include_usage) sent at one
moment from --client-procs processes (bench/stream_clients.py). Prompts are distinct per request (no
shared prefix beyond the chat template's): --prompt short (~10 words) or long (~--long-tokens tokens).

Per side and N: aggregate tokens/s = all completion tokens (usage) / (submission -> last chunk);
TTFT p50/p95 = the request's submission (when its client began sending it) -> first chunk with
content; inter-token p50/p95 = gaps between content chunks divided by the request's mean tokens per
chunk (a coalescing server sends fewer, larger chunks: tokens/chunk shows it); errors = failed
requests or requests with fewer tokens than asked.
After each round an HTTP side's line names the CPU its server process and each process below it (the
engine process) used, in cores (Linux); --profile DIR records the server process's Python stacks with
py-spy during measured rounds (bench/process_cpu.py). Then the ratios ours / engine and ours / mlx_lm and the issue's targets as PASS / FAIL lines. With
--repeat R every side runs R times, the sides taking turns (ours, engine, ours, engine, ...), and each
side's best run per N is the one reported (all runs are in the --json file).

    .venv/bin/python bench/server_streams.py --shape smollm2-135m --streams 1,4 --gen-tokens 8 \\
        --prompt short --client-procs 2                                     # CPU smoke run, under a minute
    python3 bench/server_streams.py --shape llama-1b --streams 1,32,128,256 --gen-tokens 512 \\
        --prompt short --client-procs 8 --tokenizer-dir TOK --json /tmp/streams.json   # the H100 run (bf16)

Unless given, ours gets --max-num-seqs and --kv-cache-gb sized to the largest N (every stream decodes
together, the pool holds them all) and mlx_lm.server --decode-concurrency N. On a machine without the
hub, --tokenizer-dir names a folder with the SmolLM2 tokenizer.json, tokenizer_config.json,
special_tokens_map.json and config.json (3.4 MB); the random model directory is written under the
model cache's bench/ folder (--cache-dir) and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from process_cpu import Profiler, cpu_line, tree_cpu  # noqa: E402
from server_vs_mlxlm import Server, free_port  # noqa: E402  (bench/: start, wait for ready, stop)
from stream_clients import Stream, run_clients  # noqa: E402
from stream_report import best_runs, report, side_stats  # noqa: E402

SIDES = ("ours", "thread", "engine", "mlxlm", "split")
WORDS = (
    "river quantum ledger violet harbor cactus protocol meadow lantern cipher orbit granite velvet "
    "compass falcon ember tundra mosaic signal harvest prism beacon canyon sonnet walnut glacier "
    "voltage saffron tremor anchor willow matrix pebble thunder copper nectar fractal island "
    "marble lotus puzzle quartz rocket tapestry umbrella vertex whistle yonder zephyr bamboo "
    "cobalt dune echo fjord gazelle hollow ivory jasmine kernel lagoon mango nebula oasis"
).split()
# mlx_lm.server loaded after `import server`, so on a CPU its matmuls use the same OpenBLAS as ours
MLXLM_LAUNCH = "import sys, server; from mlx_lm.server import main; sys.argv = ['mlx_lm.server'] + sys.argv[1:]; main()"


def build_model_dir(args: argparse.Namespace) -> Path:
    import cache_location
    import random_model

    if args.model:
        return Path(args.model)
    cache = cache_location.cache_dir(args)
    if args.tokenizer_dir:
        tokenizer_dir = Path(args.tokenizer_dir)
    else:
        tokenizer_dir = cache_location.default_model_dir("smollm2-135m-instruct", cache)
    # built in a process of its own: MLX's device memory (the weights, its cache, CUDA's pool) goes with it,
    # instead of staying with this process while the servers and the engine alone run on the same GPU
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        build = pool.submit(
            random_model.save_model_dir, args.shape, args.dtype, tokenizer_dir, cache / "bench", args.seed
        )
        return build.result()


def prompt_text(rng: random.Random, tag: str, kind: str, long_tokens: int, tokenizer: Any) -> str:
    """~10 words (short) or about long_tokens tokens (long), starting with a tag unique to the request."""
    if kind == "short":
        return " ".join([tag, *rng.choices(WORDS, k=9)])
    words = [tag]
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < long_tokens:
        words += rng.choices(WORDS, k=max(8, (long_tokens - len(words)) // 2))
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) > long_tokens:
        words.pop()
    return " ".join(words)


def make_requests(
    tokenizer: Any, n: int, label: str, args: argparse.Namespace
) -> tuple[list[list[dict[str, str]]], list[list[int]]]:
    """n distinct conversations (one user message each) and their prompt token ids under the chat template."""
    rng = random.Random(f"{args.seed}-{label}")
    messages = [
        [{"role": "user", "content": prompt_text(rng, f"{label}-{i}:", args.prompt, args.long_tokens, tokenizer)}]
        for i in range(n)
    ]
    ids = []
    for m in messages:
        rendered = tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
        ids.append([int(t) for t in (rendered["input_ids"] if hasattr(rendered, "keys") else rendered)])
    return messages, ids


def banned_eos(model_dir: Path) -> dict[str, float]:
    """logit_bias banning every id mlx-lm treats as an end of sequence (and the tokenizer's eos_token_id)."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model_dir)
    ids = set(tok.eos_token_ids or ()) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    return {str(i): -100.0 for i in sorted(ids)}


def bodies(model: str, messages: list[list[dict[str, str]]], max_tokens: int, bias: dict[str, float]) -> list[Any]:
    return [
        {
            "model": model,
            "messages": m,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
            "temperature": 0,
            "logit_bias": bias,
        }
        for m in messages
    ]


def http_servers(model_dir: Path, logs: Path, args: argparse.Namespace) -> dict[str, Server]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ours_port, theirs_port = free_port(), free_port()
    ours_cmd = [sys.executable, "-m", "server", "serve", "--port", str(ours_port), "--no-default-models"]
    ours_env = {**env, "MLX_DROPIN_DATA_DIR": str(logs / "data"), "MLX_DROPIN_API_KEYS": ""}
    theirs_cmd = [sys.executable, "-c", MLXLM_LAUNCH, "--model", str(model_dir), "--port", str(theirs_port)]
    return {
        "ours": Server(
            "mlx-dropin",
            [*ours_cmd, "--model", f"bench={model_dir}", *args.server_arg],
            ours_env,
            ours_port,
            logs / "ours.log",
            "/ready",
            "bench",
        ),
        "thread": Server(
            "mlx-dropin (thread)",
            [*ours_cmd, "--model", f"bench={model_dir}", *args.server_arg, "--engine=thread"],
            ours_env,
            ours_port,
            logs / "thread.log",
            "/ready",
            "bench",
        ),
        "split": Server(
            f"mlx-dropin ({args.ranks} ranks)",
            [
                str(Path(sys.executable).with_name("mlx.launch")),
                "--backend",
                "ring",
                "-n",
                str(args.ranks),
                "--python",
                sys.executable,
                str(Path(sys.executable).with_name("mlx-dropin")),
                *ours_cmd[3:],
                "--model",
                f"bench={model_dir}",
                *args.server_arg,
            ],
            ours_env,
            ours_port,
            logs / "split.log",
            "/ready",
            "bench",
        ),
        "mlxlm": Server(
            "mlx_lm.server",
            [*theirs_cmd, "--log-level", "WARNING", *args.mlxlm_arg],
            env,
            theirs_port,
            logs / "mlx_lm.log",
            "/v1/models",
            "default_model",
        ),
    }


def run_http_side(server: Server, rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[int, list[Stream]]:
    """Start the server, run every round through the clients (warm-ups discarded), stop it."""
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    out: dict[int, list[Stream]] = {}
    started = time.perf_counter()
    server.start()
    print(f"  {server.name} ready in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    assert server.proc is not None
    pid = server.proc.pid
    profiler = Profiler(Path(args.profile) if args.profile else None)
    try:
        for spec in rounds:
            before, t0 = tree_cpu(pid), time.perf_counter()
            if spec["measured"]:
                profiler.start(pid, f"{server.name.split()[0]}-{spec['label']}")
            try:
                records = run_clients(
                    url,
                    bodies(server.model, spec["messages"], spec["max_tokens"], spec["logit_bias"]),
                    args.client_procs,
                )
            finally:
                profiler.stop()
            cpu = cpu_line(pid, before, tree_cpu(pid), time.perf_counter() - t0)
            print(f"  {server.name}: {spec['label']} done{'; ' + cpu if cpu else ''}", file=sys.stderr, flush=True)
            if spec["measured"]:
                out[spec["n"]] = records
    finally:
        server.stop()
    return out


def run_engine_side(
    model_dir: Path, rounds: list[dict[str, Any]], logs: Path, args: argparse.Namespace
) -> dict[int, list[Stream]]:
    """The engine alone in a subprocess of its own, on the same token ids and lengths."""
    job, out = logs / "engine_job.json", logs / "engine_out.json"
    keep = ("label", "max_tokens", "logit_bias", "prompts")
    job.write_text(
        json.dumps(
            {
                "model_dir": str(model_dir),
                "server_args": args.server_arg,
                "rounds": [{k: r[k] for k in keep} for r in rounds],
            }
        )
    )
    command = [sys.executable, str(Path(__file__).with_name("stream_engine_side.py")), str(job), str(out)]
    with (logs / "engine.log").open("w") as log:
        rc = subprocess.run(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        ).returncode
    if rc != 0:
        raise RuntimeError(f"engine side exited {rc}: {(logs / 'engine.log').read_text()[-2000:]}")
    results = json.loads(out.read_text())
    return {r["n"]: [Stream(**s) for s in res] for r, res in zip(rounds, results) if r["measured"]}


def plan_rounds(tokenizer: Any, bias: dict[str, float], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per N: a warm-up round (if --warmup-tokens) and the measured round, with distinct prompts."""
    rounds = []
    for n in args.streams:
        for measured in (False, True):
            if not measured and args.warmup_tokens <= 0:
                continue
            label = f"{'run' if measured else 'warm'}{n}"
            messages, ids = make_requests(tokenizer, n, label, args)
            max_tokens = args.gen_tokens if measured else args.warmup_tokens
            rounds.append(
                dict(
                    n=n,
                    measured=measured,
                    label=label,
                    messages=messages,
                    prompts=ids,
                    max_tokens=max_tokens,
                    logit_bias=bias,
                )
            )
    return rounds


def _given(flags: list[str], name: str) -> bool:
    return any(f == name or f.startswith(name + "=") for f in flags)


def size_servers(model_dir: Path, rounds: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Unless given: ours decodes every stream together (--max-num-seqs N) with a KV pool that holds them all
    (--kv-cache-gb, 1.25x the need, at least the default 2), and mlx_lm.server --decode-concurrency N."""
    most = max(args.streams)
    if not _given(args.server_arg, "--max-num-seqs"):
        args.server_arg.append(f"--max-num-seqs={most}")
    if not _given(args.server_arg, "--kv-cache-gb"):
        config = json.loads((model_dir / "config.json").read_text())
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        import mlx.core as mx

        itemsize = 4 if mx.default_device() == mx.cpu else 2  # the server runs float32 on a CPU
        per_token = 2 * config["num_hidden_layers"] * heads * head_dim * itemsize
        tokens = max(sum(len(p) + r["max_tokens"] + 16 for p in r["prompts"]) for r in rounds)
        args.server_arg.append(f"--kv-cache-gb={max(2.0, math.ceil(1.25 * tokens * per_token / 2**30 * 4) / 4)}")
    if not _given(args.mlxlm_arg, "--decode-concurrency"):
        args.mlxlm_arg.append(f"--decode-concurrency={most}")


def main() -> int:
    import cache_location
    import random_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--shape", choices=random_model.SHAPES, default="smollm2-135m", help="random weights in this shape"
    )
    src.add_argument("--model", help="an existing MLX model directory instead of random weights")
    p.add_argument(
        "--tokenizer-dir",
        help="where the SmolLM2 tokenizer files and config.json are (default: the cached default model; "
        "on a machine without the hub, carry those four small files and point here)",
    )
    p.add_argument("--dtype", default="auto", help="random weights: auto = bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--streams", default="1,32,128,256", help="concurrent streams per round (default %(default)s)")
    p.add_argument("--gen-tokens", type=int, default=512, help="completion tokens per request (default %(default)s)")
    p.add_argument("--prompt", choices=("short", "long"), default="short")
    p.add_argument("--long-tokens", type=int, default=500, help="user message tokens of a long prompt")
    p.add_argument("--client-procs", type=int, default=8, help="client processes (default %(default)s)")
    p.add_argument("--sides", default="ours,engine,mlxlm", help="which sides, in this order (default %(default)s)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the split side (default %(default)s)")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens per warm-up request; 0: no warm-up")
    p.add_argument("--repeat", type=int, default=1, help="runs per side, taking turns; the best is reported")
    p.add_argument(
        "--server-arg", action="append", default=[], help="a flag for our server (and the engine side); repeat"
    )
    p.add_argument(
        "--mlxlm-arg", action="append", default=[], help="a flag for mlx_lm.server, e.g. --decode-concurrency=256"
    )
    p.add_argument(
        "--profile", metavar="DIR", help="py-spy the HTTP sides' server process during measured rounds (raw stacks)"
    )
    p.add_argument("--json", metavar="OUT", help="write the raw records and the statistics here")
    p.add_argument("--seed", type=int, default=0)
    cache_location.add_cache_dir_argument(p)
    args = p.parse_args()
    args.streams = [int(n) for n in args.streams.split(",")]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if bad := [s for s in sides if s not in SIDES]:
        p.error(f"unknown sides {bad}: choose from {', '.join(SIDES)}")

    import mlx.core as mx
    import mlx_lm
    from transformers import AutoTokenizer

    import server

    model_dir = build_model_dir(args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bias = banned_eos(model_dir)
    rounds = plan_rounds(tokenizer, bias, args)
    size_servers(model_dir, rounds, args)
    logs = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    meta = {
        "model_dir": str(model_dir),
        "model": args.model or f"{args.shape} random weights ({args.dtype})",
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "mlx_lm": mlx_lm.__version__,
        "server": getattr(server, "__version__", "?"),
        "cpus": os.cpu_count(),
        "streams": args.streams,
        "gen_tokens": args.gen_tokens,
        "prompt": args.prompt,
        "client_procs": args.client_procs,
        "repeat": args.repeat,
        "server_args": args.server_arg,
        "mlxlm_args": args.mlxlm_arg,
        "banned_eos": sorted(int(k) for k in bias),
        "logs": str(logs),
    }
    print(json.dumps(meta), flush=True)
    servers = http_servers(model_dir, logs, args)
    runs: dict[str, list[dict[int, list[Stream]]]] = {side: [] for side in sides}
    for _ in range(max(1, args.repeat)):
        for side in sides:
            if side == "engine":
                runs[side].append(run_engine_side(model_dir, rounds, logs, args))
            else:
                runs[side].append(run_http_side(servers[side], rounds, args))
    every = {
        side: [{n: side_stats(recs, args.gen_tokens) for n, recs in by_n.items()} for by_n in side_runs]
        for side, side_runs in runs.items()
    }
    stats = {side: best_runs(side_runs) for side, side_runs in every.items()}
    for line in report(stats, args.streams):
        print(line, flush=True)
    if args.json:
        raw = {
            side: [{str(n): [r.__dict__ for r in recs] for n, recs in by_n.items()} for by_n in side_runs]
            for side, side_runs in runs.items()
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "stats": stats, "runs": every, "records": raw}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
