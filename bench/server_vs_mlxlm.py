"""This server against `mlx_lm.server` on the same model and machine, one after the other in one run.

Both servers get the same float32 copy of the default SmolLM2-135M-Instruct (MLX's CPU quantized
matmul is slow; our server dequantizes to float32 on the CPU, so mlx_lm.server gets float32 too),
greedy decoding, and the same requests through the `openai` SDK (AsyncOpenAI, streaming).

Scenarios:
  agents      N agents x T turns, all agents concurrent, every agent's conversation growing turn by
              turn after a shared system prompt (about --system-words words). Ours passes
              `prompt_cache_key` per agent (what an agent framework sets; mlx_lm.server ignores it and
              uses its own prompt cache). Reports total wall time and TTFT p50 per turn, and the
              ratios ours / mlx_lm.
  throughput  --fresh concurrent requests with distinct prompts (no shared prefix), --gen-tokens
              each: aggregate completion tokens/s (from `usage`) and the ratio ours / mlx_lm.

Each server starts as a subprocess on a free port, is warmed up with two requests, measured, and
stopped before the other starts (they never share the cores). --reverse puts mlx_lm.server first;
--rounds N repeats both sides N times, alternating which goes first, and prints the median ratios. Connections a server drops are retried by the SDK (up to 3 times, counted in the time).

    .venv/bin/python bench/server_vs_mlxlm.py                                  # 24 agents x 4 turns, 16 fresh
    .venv/bin/python bench/server_vs_mlxlm.py --scenario agents --agents 8 --turns 3
    .venv/bin/python bench/server_vs_mlxlm.py --rounds 3                      # ~18 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_ID = "smollm2-135m-instruct"
# the SDK retries a dropped connection (mlx_lm.server's HTTP server queues only 5 pending connections,
# and 16-24 clients connecting at once can overflow it); a retried request's time counts in full
RETRIES = 3
TOPICS = (
    "invoices",
    "a flaky test",
    "a database migration",
    "the release notes",
    "an outage report",
    "a customer email",
    "the onboarding guide",
    "a pricing page",
    "log rotation",
    "a memory leak",
    "the API docs",
    "a code review",
    "unit conversions",
    "a budget table",
    "the roadmap",
    "cache misses",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def float32_model_dir(cache_dir: Path) -> Path:
    """A float32 MLX copy of the default chat model (built once, kept in the model cache at cache_dir)."""
    import cache_location

    out = cache_dir / "bench" / "smollm2-135m-instruct-f32"
    if (out / "config.json").is_file():
        return out
    import json

    from mlx_lm.utils import save_config, save_model

    from server.models.loading import load_chat_model

    src = cache_location.default_model_dir(MODEL_ID, cache_dir)
    model, tokenizer = load_chat_model(src, "float32")
    tmp = out.with_suffix(".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(tmp, model, donate_model=False)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    save_config(config, config_path=tmp / "config.json")
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    log: Path
    ready_path: str  # answers 200 once the model can generate
    model: str  # what requests put in `model`
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        import httpx

        self.proc = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.PIPE,  # open and silent: mlx.launch (the split side) spins a core on a stdin at EOF
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not start")

    def stop(self) -> None:
        """SIGTERM, then wait for the server and every process it started (engine processes, ranks) to be gone,
        so the next side never shares the device with a leftover (SIGKILL after 30 s)."""
        if self.proc is None:
            return
        from process_cpu import running, tree_cpu

        tree = set(tree_cpu(self.proc.pid)) - {self.proc.pid}
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        deadline = time.monotonic() + 30
        while (left := [p for p in tree if running(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def servers(model_dir: Path, data_dir: Path, logs: Path, extra: list[str]) -> list[Server]:
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ours_port, theirs_port = free_port(), free_port()
    ours = Server(
        "mlx-dropin",
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--port",
            str(ours_port),
            "--no-default-models",
            "--model",
            f"{MODEL_ID}={model_dir}",
            *extra,
        ],
        {**base_env, "MLX_DROPIN_DATA_DIR": str(data_dir), "MLX_DROPIN_API_KEYS": ""},
        ours_port,
        logs / "ours.log",
        "/ready",
        MODEL_ID,
    )
    # `import server` first loads OpenBLAS into the process, so mlx_lm.server's matmuls use it as ours do
    launch = "import sys, server; from mlx_lm.server import main; sys.argv = ['mlx_lm.server'] + sys.argv[1:]; main()"
    theirs = Server(
        "mlx_lm.server",
        [sys.executable, "-c", launch, "--model", str(model_dir), "--port", str(theirs_port), "--log-level", "WARNING"],
        base_env,
        theirs_port,
        logs / "mlx_lm.log",
        "/v1/models",
        "default_model",
    )
    return [ours, theirs]


@dataclass
class TurnResult:
    ttft: float
    completion_tokens: int
    text: str


@dataclass
class AgentsResult:
    wall: float
    ttft_by_turn: list[list[float]] = field(default_factory=list)
    tokens: int = 0
    cached_by_turn: list[list[int]] = field(default_factory=list)


async def chat_turn(client, model: str, messages: list[dict[str, str]], max_tokens: int, key: str | None) -> TurnResult:
    extra = {"prompt_cache_key": key} if key else {}
    start = time.perf_counter()
    ttft = None
    parts: list[str] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    return TurnResult(ttft if ttft is not None else time.perf_counter() - start, tokens or len(parts), "".join(parts))


async def run_agents(server: Server, args: argparse.Namespace, is_ours: bool) -> AgentsResult:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=RETRIES, timeout=1800)
    words = (
        "You are a careful assistant for a software team. Keep answers short and concrete. "
        "Follow the team's conventions, cite file names when relevant, and never invent facts. "
    ).split()
    system = " ".join((words * (args.system_words // len(words) + 1))[: args.system_words])
    histories = [[{"role": "system", "content": system}] for _ in range(args.agents)]
    result = AgentsResult(0.0, [[] for _ in range(args.turns)])
    start = time.perf_counter()

    async def agent(i: int) -> None:
        for turn in range(args.turns):
            topic = TOPICS[(i + turn) % len(TOPICS)]
            histories[i].append(
                {"role": "user", "content": f"Agent {i}, step {turn + 1}: summarize {topic} in one sentence."}
            )
            r = await chat_turn(client, server.model, histories[i], args.max_tokens, f"agent-{i}" if is_ours else None)
            histories[i].append({"role": "assistant", "content": r.text})
            result.ttft_by_turn[turn].append(r.ttft)
            result.tokens += r.completion_tokens

    await asyncio.gather(*(agent(i) for i in range(args.agents)))
    result.wall = time.perf_counter() - start
    await client.close()
    return result


async def run_throughput(server: Server, args: argparse.Namespace) -> tuple[float, int, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=RETRIES, timeout=1800)

    async def one(i: int) -> int:
        r = await client.chat.completions.create(
            model=server.model,
            temperature=0,
            max_tokens=args.gen_tokens,
            messages=[
                {
                    "role": "user",
                    "content": f"Request {i}: write a long story about {TOPICS[i % len(TOPICS)]} "
                    f"and number {i * 7919}.",
                }
            ],
        )
        return r.usage.completion_tokens

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(args.fresh))))
    wall = time.perf_counter() - start
    await client.close()
    return tokens / wall, tokens, wall


async def warm_up(server: Server) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
    for i in range(2):
        await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=4, temperature=0
        )
    await client.close()


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def measure(
    order: list[Server], args: argparse.Namespace
) -> tuple[dict[str, AgentsResult], dict[str, tuple[float, int, float]]]:
    """One round: each server in `order` started, warmed up, measured and stopped in turn."""
    agents: dict[str, AgentsResult] = {}
    throughput: dict[str, tuple[float, int, float]] = {}
    for server in order:
        is_ours = server.name == "mlx-dropin"
        server.start()
        try:
            asyncio.run(warm_up(server))
            if args.scenario in ("agents", "both"):
                agents[server.name] = asyncio.run(run_agents(server, args, is_ours))
                print(f"  {server.name}: agents done in {agents[server.name].wall:.1f}s", flush=True)
            if args.scenario in ("throughput", "both"):
                throughput[server.name] = asyncio.run(run_throughput(server, args))
                print(f"  {server.name}: throughput done in {throughput[server.name][2]:.1f}s", flush=True)
        finally:
            server.stop()
    return agents, throughput


def report(
    agents: dict[str, AgentsResult], throughput: dict[str, tuple[float, int, float]], args: argparse.Namespace
) -> dict[str, float]:
    """Print one round's tables; return its ratios (wall, last-turn TTFT, throughput) ours / mlx_lm."""
    ours, theirs = "mlx-dropin", "mlx_lm.server"
    ratios: dict[str, float] = {}
    if agents:
        a, b = agents[ours], agents[theirs]
        print(
            f"\nagents: {args.agents} agents x {args.turns} turns, shared system prompt of {args.system_words} "
            f"words, {args.max_tokens} tokens a turn, all concurrent"
        )
        print(f"{'':16} {'wall s':>8} " + " ".join(f"{'TTFT p50 t' + str(t + 1):>13}" for t in range(args.turns)))
        for name, r in ((ours, a), (theirs, b)):
            print(f"{name:16} {r.wall:8.1f} " + " ".join(f"{p50(x):13.2f}" for x in r.ttft_by_turn))
        print(
            f"{'ours / mlx_lm':16} {a.wall / b.wall:8.2f} "
            + " ".join(f"{p50(x) / p50(y):13.2f}" for x, y in zip(a.ttft_by_turn, b.ttft_by_turn))
        )
        ratios["wall"] = a.wall / b.wall
        ratios["last-turn TTFT"] = p50(a.ttft_by_turn[-1]) / p50(b.ttft_by_turn[-1])
    if throughput:
        (ta, na, wa), (tb, nb, wb) = throughput[ours], throughput[theirs]
        print(f"\nthroughput: {args.fresh} concurrent fresh requests, max_tokens {args.gen_tokens}")
        print(f"{'':16} {'tok/s':>8} {'tokens':>7} {'wall s':>7}")
        print(f"{ours:16} {ta:8.1f} {na:7d} {wa:7.1f}")
        print(f"{theirs:16} {tb:8.1f} {nb:7d} {wb:7.1f}")
        print(f"{'ours / mlx_lm':16} {ta / tb:8.2f}")
        ratios["throughput"] = ta / tb
    return ratios


def main() -> None:
    import cache_location  # the model cache, found as the server finds it

    import server  # noqa: F401  (OpenBLAS before mlx.core)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("agents", "throughput", "both"), default="both")
    parser.add_argument("--agents", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per agent turn")
    parser.add_argument("--fresh", type=int, default=16, help="concurrent fresh requests (throughput)")
    parser.add_argument("--gen-tokens", type=int, default=64, help="max_tokens per fresh request")
    parser.add_argument("--reverse", action="store_true", help="measure mlx_lm.server first (in the first round)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of both sides, alternating which goes first; prints every round and the "
        "median of each ratio (this machine's noise moves single runs by 15%% or more)",
    )
    parser.add_argument(
        "--only",
        choices=("mlx-dropin", "mlx_lm.server"),
        help="measure one side (no ratios): for trying server settings",
    )
    parser.add_argument("--server-args", default="", help="extra flags for our server, e.g. '--prefill-chunk 64'")
    cache_location.add_cache_dir_argument(parser)
    args = parser.parse_args()

    import mlx.core as mx
    import mlx_lm

    model_dir = float32_model_dir(cache_location.cache_dir(args))
    logs = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    print(
        f"model {model_dir} (float32); mlx {mx.__version__} on {mx.default_device()}; mlx-lm {mlx_lm.__version__}; "
        f"{os.cpu_count()} CPUs; logs in {logs}"
    )
    rounds: list[dict[str, float]] = []
    for number in range(args.rounds):
        round_logs = logs / f"round{number + 1}"
        round_logs.mkdir()
        order = servers(model_dir, round_logs / "data", round_logs, args.server_args.split())
        if args.reverse != (number % 2 == 1):
            order.reverse()
        if args.only:
            order = [s for s in order if s.name == args.only]
        if args.rounds > 1:
            print(f"\nround {number + 1} of {args.rounds}: {' then '.join(s.name for s in order)}", flush=True)
        agents, throughput = measure(order, args)
        if args.only:
            for name, r in agents.items():
                print(
                    f"\n{name} agents: wall {r.wall:.1f} s, TTFT p50 by turn "
                    + " / ".join(f"{p50(x):.2f}" for x in r.ttft_by_turn)
                    + " s"
                )
            for name, (t, n, w) in throughput.items():
                print(f"{name} throughput: {t:.1f} tok/s ({n} tokens in {w:.1f} s)")
            continue
        rounds.append(report(agents, throughput, args))
    if len(rounds) > 1:
        print(f"\nratios ours / mlx_lm over {len(rounds)} rounds (median; every round)")
        for key in rounds[0]:
            values = [r[key] for r in rounds]
            print(f"{key:16} {statistics.median(values):6.2f}   " + ", ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    main()
