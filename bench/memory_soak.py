"""A memory soak: our server under N concurrent streams for --minutes, MLX's memory sampled from /metrics.

The server (`python -m server serve --no-default-models --model soak=DIR`, plus --server-arg flags) runs
a random-weight model in a real shape (--shape) with the default SmolLM2 tokenizer; the directory is
built once under the model cache's bench/ folder. --client-procs processes keep --streams streaming chat
requests in flight until the time is up: prompt lengths and max_tokens vary per request (so batch
shapes keep changing, which is what fills MLX's buffer cache), every special token is banned so each
request runs to its max_tokens. Every --sample-s seconds the script reads
`mlx_dropin_mlx_memory_bytes{kind=active|cache|peak|limit}` and the running sequences from /metrics.

It prints the samples, then the verdicts:
  memory   FLAT if the most active+cache memory of the run's second half is at most (1 + --tolerance)
           times the first half's (the first half includes the warm-up), else GROWING
  requests every request finished with all its tokens (usage.completion_tokens == max_tokens, [DONE])
  exit     SIGTERM at the end: exit status 0 and no "terminate called" / abort / traceback in the log
and exits 1 if any verdict fails. The server log is kept (path printed).

    .venv/bin/python bench/memory_soak.py --shape tiny --streams 16 --minutes 0.5 --gen-tokens 16 \\
        --client-procs 2 --sample-s 2                                   # CPU smoke run, ~1 minute
    python3 bench/memory_soak.py --shape llama-1b --streams 256 --minutes 10 --gen-tokens 512 \\
        --client-procs 8 --server-arg=--kv-cache-gb=12 --json /tmp/soak.json   # the H100 soak (bf16)

--max-num-seqs is set to --streams unless a --server-arg gives it. 256 streams of up to ~80 prompt + 512
generated tokens need ~150k tokens of KV: 4.6 GiB at Llama-1B's 32 KiB per token, hence --kv-cache-gb.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cache_location  # noqa: E402
from server_vs_mlxlm import Server, free_port  # noqa: E402

TINY = {  # a few MB: a CPU smoke run
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
WORDS = "river ledger violet harbor cactus meadow lantern cipher orbit granite velvet compass falcon ember".split()
CRASH_SIGNS = ("terminate called", "Abort", "Traceback", "out of memory")
MEMORY = re.compile(r'^mlx_dropin_mlx_memory_bytes\{kind="(\w+)",process="[^"]*"\} (\S+)$', re.M)
RUNNING = re.compile(r'^mlx_dropin_sequences\{model="[^"]*",state="running"\} (\S+)$', re.M)


def shape_config(shape: str) -> dict[str, Any]:
    if shape == "tiny":
        return dict(TINY)
    from random_model import LLAMA_1B  # Llama-3.2-1B's config

    if shape != "llama-1b":
        raise SystemExit(f"--shape must be tiny or llama-1b, not {shape!r}")
    return dict(LLAMA_1B)


def build_model_dir(args: argparse.Namespace) -> Path:
    """A random-weight mlx-lm model directory in `--shape`, vocabulary sized to SmolLM2's tokenizer (built once)."""
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import _get_classes, save_config, save_model
    from tokenizers import Tokenizer

    cache = cache_location.cache_dir(args)
    tokenizer_dir = (
        Path(args.tokenizer_dir)
        if args.tokenizer_dir
        else cache_location.default_model_dir("smollm2-135m-instruct", cache)
    )
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    dtype_name = ("bfloat16" if on_gpu else "float32") if args.dtype == "auto" else args.dtype
    out = cache / "bench" / f"soak-{args.shape}-{dtype_name}"
    if (out / "config.json").exists():
        return out
    config = shape_config(args.shape)
    config["vocab_size"] = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(True)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(config))
    dtype = getattr(mx, dtype_name)
    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model, donate_model=True)
    save_config(config, config_path=tmp / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, tmp / name)
    tmp.rename(out)
    return out


def banned_special_tokens(model_dir: Path) -> dict[str, float]:
    """logit_bias banning every special token (EOS among them), so requests run to max_tokens."""
    added = json.loads((model_dir / "tokenizer.json").read_text()).get("added_tokens", [])
    return {str(t["id"]): -100.0 for t in added if t.get("special")}


# -- clients (each process runs its share of the streams until the deadline) --------------------------
async def one_request(client: Any, url: str, rng: random.Random, args: dict[str, Any]) -> bool:
    max_tokens = rng.randint(max(1, args["gen_tokens"] // 2), args["gen_tokens"])
    prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, args["max_prompt_words"])))
    body = {
        "model": "soak",
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": args["bias"],
        "stream_options": {"include_usage": True},
    }
    usage, done = None, False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return False
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage") or usage
    except Exception:  # noqa: BLE001 - a failed request is counted, not raised
        return False
    return done and usage is not None and usage.get("completion_tokens") == max_tokens


async def client_loop(n: int, seed: int, deadline: float, args: dict[str, Any]) -> tuple[int, int]:
    import httpx

    ok = failed = 0
    url = args["base"] + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)

    async def worker(i: int) -> None:
        nonlocal ok, failed
        rng = random.Random(seed * 100_003 + i)
        while time.time() < deadline:
            if await one_request(client, url, rng, args):
                ok += 1
            else:
                failed += 1

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(worker(i) for i in range(n)))
    return ok, failed


def client_process(n: int, seed: int, deadline: float, args: dict[str, Any], results: Any) -> None:
    results.put(asyncio.run(client_loop(n, seed, deadline, args)))


# -- sampling and verdicts ---------------------------------------------------------------------------
def sample(base: str) -> dict[str, float] | None:
    import httpx

    try:
        text = httpx.get(base + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    values: dict[str, float] = {}
    for kind, v in MEMORY.findall(text):  # summed over the server and its engine processes
        values[kind] = values.get(kind, 0.0) + float(v)
    values["running"] = sum(float(v) for v in RUNNING.findall(text))
    return values


def memory_verdict(samples: list[tuple[float, dict[str, float]]], tolerance: float) -> tuple[bool, str]:
    """FLAT when the second half's most active+cache is at most (1 + tolerance) x the first half's."""
    if len(samples) < 4:
        return False, "too few samples (run longer or sample more often)"
    middle = (samples[0][0] + samples[-1][0]) / 2
    first = max(s["active"] + s["cache"] for t, s in samples if t <= middle)
    second = max(s["active"] + s["cache"] for t, s in samples if t > middle)
    flat = second <= first * (1 + tolerance)
    ratio = second / first if first else float("inf")
    return (
        flat,
        f"max active+cache: first half {first / 2**30:.3f} GiB, second half {second / 2**30:.3f} GiB ({ratio:.3f}x)",
    )


def stop_server(server: Server) -> tuple[bool, str]:
    """SIGTERM; the exit verdict: status 0 and no sign of a crash in the log."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(120)
    log = server.log.read_text(errors="replace")
    signs = [s for s in CRASH_SIGNS if s in log]
    return code == 0 and not signs, f"exit status {code}" + (f", log has {signs}" if signs else "")


def server_flags(args: argparse.Namespace) -> list[str]:
    """--server-arg flags, with --max-num-seqs = --streams unless given (every stream decodes at once)."""
    given = any(flag.split("=")[0] == "--max-num-seqs" for flag in args.server_arg)
    return [*args.server_arg, *([] if given else [f"--max-num-seqs={args.streams}"])]


def watch(base: str, procs: list[Any], started: float, every: float) -> list[tuple[float, dict[str, float]]]:
    """Sample /metrics every `every` seconds while any client process runs, printing each sample."""
    samples: list[tuple[float, dict[str, float]]] = []
    print(f"{'t (s)':>7} {'running':>8} {'active GiB':>11} {'cache GiB':>10} {'peak GiB':>9}", flush=True)
    while any(proc.is_alive() for proc in procs):
        got = sample(base)
        if got is not None and "active" in got:
            t = time.time() - started
            samples.append((t, got))
            g = 2**30
            row = f"{t:7.1f} {got['running']:8.0f} {got['active'] / g:11.3f} {got['cache'] / g:10.3f} {got['peak'] / g:9.3f}"
            print(row, flush=True)
        time.sleep(every)
    return samples


def run(args: argparse.Namespace) -> int:
    model_dir = build_model_dir(args)
    work = Path(tempfile.mkdtemp(prefix="memory-soak-"))
    port = free_port()
    server = Server(
        "mlx-dropin",
        [sys.executable, "-m", "server", "serve", "--port", str(port), "--no-default-models", "--offline"]
        + ["--model", f"soak={model_dir}", "--data-dir", str(work / "data"), *server_flags(args)],
        {**os.environ, "PYTHONUNBUFFERED": "1"},
        port,
        work / "server.log",
        "/ready",
        "soak",
    )
    base = f"http://127.0.0.1:{port}"
    print(f"model {model_dir} ({args.shape}); server log {server.log}", flush=True)
    server.start()
    shared = {
        "base": base,
        "gen_tokens": args.gen_tokens,
        "max_prompt_words": args.max_prompt_words,
        "bias": banned_special_tokens(model_dir),
    }
    started = time.time()
    deadline = started + args.minutes * 60
    results: Any = multiprocessing.get_context("spawn").Queue()
    per = [args.streams // args.client_procs + (i < args.streams % args.client_procs) for i in range(args.client_procs)]
    procs = [
        multiprocessing.get_context("spawn").Process(target=client_process, args=(n, i, deadline, shared, results))
        for i, n in enumerate(per)
        if n
    ]
    for proc in procs:
        proc.start()
    samples = watch(base, procs, started, args.sample_s)
    for proc in procs:
        proc.join()
    ok = failed = 0
    for _ in procs:
        a, b = results.get(timeout=30)
        ok, failed = ok + a, failed + b
    flat, memory_note = memory_verdict(samples, args.tolerance)
    exited, exit_note = stop_server(server)
    finished = failed == 0 and ok > 0
    print(f"memory:   {'FLAT' if flat else 'GROWING'}: {memory_note}")
    print(f"requests: {'PASS' if finished else 'FAIL'}: {ok} finished with all their tokens, {failed} failed")
    print(f"exit:     {'PASS' if exited else 'FAIL'}: {exit_note}")
    if args.json:
        summary = {"flat": flat, "ok": ok, "failed": failed, "exit_clean": exited, "samples": samples}
        Path(args.json).write_text(json.dumps({"args": vars(args), **summary}, indent=1))
    return 0 if flat and finished and exited else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", help="tiny (CPU smoke) or llama-1b (Llama-3.2-1B's shape)")
    p.add_argument("--dtype", default="auto", help="auto = bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--streams", type=int, default=256, help="requests in flight at every moment")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--gen-tokens", type=int, default=256, help="max_tokens is drawn from [gen/2, gen] per request")
    p.add_argument("--max-prompt-words", type=int, default=60, help="prompts are 5..this many words")
    p.add_argument("--client-procs", type=int, default=8)
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between /metrics samples")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed growth of the second half's maximum")
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra `serve` flag (repeat; e.g. --kv-cache-gb=20)"
    )
    p.add_argument("--json", help="write the samples and verdicts here")
    p.add_argument("--tokenizer-dir", help="a folder with SmolLM2's tokenizer files (a machine without the hub)")
    cache_location.add_cache_dir_argument(p)
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
