"""Our Engine against mlx-lm's BatchGenerator on the same requests, in one process.

Two scenarios, greedy decoding and a fixed number of generated tokens on both sides (ours with
ignore_eos, mlx-lm without stop tokens):

1. batch: B requests of --prompt-len random token ids each generate --gen-len tokens, submitted at
   once, for every B in --batches, after a warm-up round per side (other random prompts; before
   every batch size on a GPU, once before the first on the CPU: --warmup-each). With --repeat R,
   R rounds per side, alternating, and each side's best round (decode tok/s) is reported. Per side:
     decode tok/s  sum over requests of (tokens - 1) / (first token of the batch -> last token of the
                   batch): time to first token is outside the window, except where a side staggers
                   admissions (both do at B > 8 with their default prefill settings);
     steady tok/s  tokens emitted while every request is decoding / (last request's first token ->
                   first request's last token): full-batch decode, no prefill inside;
     e2e tok/s     all tokens / (submission -> last token);
     TTFT          mean time from submission to a request's first token (mlx-lm's BatchGenerator
                   reports a token only after feeding it, one step later than ours).
   "agree" is the fraction of requests whose greedy tokens are identical on both sides. Sides
   alternate which one runs first.
2. multi-turn: --agents conversations x --turns turns, in lock step (every agent's turn t is
   submitted together). Turn t+1's prompt is turn t's prompt + turn t's output + --turn-new new
   tokens. Ours passes a conversation key (the finished turn's KV stays pinned); mlx-lm's
   BatchGenerator recomputes every prompt from scratch. With --mlxlm-reuse, a third line feeds
   mlx-lm's BatchGenerator the prompt cache its finished turn returned (what mlx_lm.server's
   prompt cache does), so only the new tokens are computed there too.

Models: the default SmolLM2-135M-Instruct from the model cache (--cache-dir, else
MLX_DROPIN_CACHE_DIR, else ~/.cache/mlx-dropin, as the server), --model DIR for another MLX model
directory, or random weights: --shape llama-1b (Llama-3.2-1B's shape) or --random-weights CONFIG_JSON.
Random-weight models get random prompts like the others; their detokenizer is the default
SmolLM2 tokenizer, used directly when the model's vocabulary fits in it, else with ids folded modulo
its size (decode costs what a real BPE decode of that many tokens costs; the text is meaningless).
mlx-lm's side does not detokenize unless --mlxlm-detok (its streaming detokenizer per request,
as mlx_lm.server does); ours always does.

    .venv/bin/python bench/engine_vs_mlxlm.py                         # CPU defaults, ~3 minutes on 2 idle cores
    .venv/bin/python bench/engine_vs_mlxlm.py --shape llama-1b --batches 1,8,32,64 --gen-len 128
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache_location  # noqa: E402  (bench/: the model cache, found as the server finds it)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import random_model  # noqa: E402  (bench/: random weights in a real shape)

import server  # noqa: E402,F401  (loads OpenBLAS before mlx.core)
from server.engine import (  # noqa: E402
    Engine,
    EngineConfig,
    GenerationRequest,
    SamplingParams,
    SchedulerConfig,
    TokenEvent,
)
from server.engine.detokenizer import IdsToText  # noqa: E402

SHAPES = random_model.SHAPES


# -- models ------------------------------------------------------------------------------------------
class FoldedTokenizer:
    """A tokenizer whose decode accepts any id: ids are folded modulo the wrapped vocabulary."""

    def __init__(self, inner: Any, size: int) -> None:
        self.inner, self.size = inner, size
        self.text = IdsToText(inner)  # the engine's own fast path, kept under the folding
        self.eos_token_ids = set(getattr(inner, "eos_token_ids", ()) or ())
        self.eos_token_id = getattr(inner, "eos_token_id", None)

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return self.text.decode([i % self.size for i in ids], **kwargs)

    @property
    def vocab(self) -> dict[str, int]:
        return self.inner.vocab

    @property
    def detokenizer(self) -> Any:
        """mlx-lm's streaming detokenizer (for --mlxlm-detok), folding ids the same way."""
        return _FoldedDetokenizer(self.inner.detokenizer, self.size)


class _FoldedDetokenizer:
    def __init__(self, inner: Any, size: int) -> None:
        self.inner, self.size = inner, size

    def add_token(self, token: int) -> None:
        self.inner.add_token(token % self.size)

    @property
    def last_segment(self) -> str:
        return self.inner.last_segment

    def finalize(self) -> None:
        self.inner.finalize()


def materialize_private_arrays(model: Any) -> list[str]:
    """Evaluate arrays modules keep outside their parameters (e.g. Llama 3 RoPE's ``_freqs``) here.

    They are built lazily at construction on this thread's stream; our engine thread evaluating them
    fails with "There is no Stream(cpu, 0) in current thread" (an engine bug this benchmark works
    around and reports)."""
    found = [
        (f"{name}.{key}" if name else key, value)
        for name, module in model.named_modules()
        for key, value in module.items()
        if key.startswith("_") and isinstance(value, mx.array)
    ]
    mx.eval([value for _, value in found])
    return [name for name, _ in found]


def default_model_dir(args: argparse.Namespace) -> Path:
    """The default SmolLM2-135M-Instruct in the cache --cache-dir / MLX_DROPIN_CACHE_DIR names."""
    return cache_location.default_model_dir("smollm2-135m-instruct", cache_location.cache_dir(args))


def load_models(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer for our engine, description)."""
    if args.shape or args.random_weights:
        from mlx_lm.utils import load_tokenizer

        if args.shape:
            config = random_model.shape_config(args.shape, default_model_dir(args))
        else:
            config = json.loads(Path(args.random_weights).read_text())
        dtype = random_model.pick_dtype(args.dtype)
        model = random_model.random_model(config, dtype, args.seed)
        tok = load_tokenizer(default_model_dir(args))
        vocab = int(config["vocab_size"])
        tok_size = len(tok.vocab)
        if vocab <= tok_size:
            note = "SmolLM2 tokenizer (ids fit)"
            our_tok = tok
        else:
            note = f"SmolLM2 tokenizer, ids folded modulo {tok_size} for decode"
            our_tok = FoldedTokenizer(tok, tok_size)
        name = args.shape or Path(args.random_weights).name
        return model, our_tok, f"{name} random weights, {dtype}; detokenizer: {note}"
    from server.models.loading import load_chat_model

    path = Path(args.model) if args.model else default_model_dir(args)
    model, tok = load_chat_model(path)
    dtype = next(iter(v.dtype for _, v in _flat(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)))
    return model, tok, f"{path.name}, {dtype}"


def engine_model(model: Any, exact: bool) -> tuple[Any, str]:
    """The model our engine runs: on a CPU, what the server runs there (the same weights in a second module
    tree switched to server/models/cpu_layers.py), so mlx-lm's side keeps its own modules; else `model`."""
    if exact or mx.default_device() != mx.cpu:
        return model, "mlx-lm's modules"
    from server.finetune.adapters import rebuild_sharing_weights
    from server.models.cpu_layers import speed_up_for_cpu

    ours = rebuild_sharing_weights(model, lambda: type(model)(model.args))
    ours.eval()
    return ours, f"cpu layers on {speed_up_for_cpu(ours)} modules"


def _flat(tree: Any) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def vocab_size(model: Any) -> int:
    return int(model.args.vocab_size)


# -- one round per side -------------------------------------------------------------------------------
@dataclass
class Round:
    t_submit: float
    first: list[float]  # per request: time of its first token
    last: list[float]  # per request: time of its last token
    tokens: list[list[int]]  # per request: generated ids
    times: list[list[float]] = field(default_factory=list)  # per request: time of each token
    prompt_computed: int = 0
    prompt_reused: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return max(self.last) - self.t_submit

    @property
    def total(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tps(self) -> float:
        span = max(self.last) - min(self.first)
        n = sum(len(t) - 1 for t in self.tokens)
        return n / span if span > 0 else math.nan

    @property
    def steady_tps(self) -> float:
        """Tokens per second while every request is decoding: (last first token, first last token].

        The edges are shifted by a little (a tenth of a step, at most 1 ms) so that tokens of one step,
        which reach our sinks microseconds apart, all fall on the same side of each edge."""
        t0, t1 = max(self.first), min(self.last)
        gaps = [float(np.median(np.diff(t))) for t in self.times if len(t) > 1]
        if t1 <= t0 or not gaps:
            return math.nan
        eps = min(0.1 * min(gaps), 1e-3)
        n = sum(sum(1 for t in times if t0 + eps < t <= t1 + eps) for times in self.times)
        return n / (t1 - t0)

    @property
    def e2e_tps(self) -> float:
        return self.total / self.wall

    @property
    def ttft_ms(self) -> float:
        return 1e3 * (sum(self.first) / len(self.first) - self.t_submit)


def run_ours(
    engine: Engine, prompts: list[list[int]], gen: int, tag: str, conversation_keys: list[str] | None = None
) -> Round:
    n = len(prompts)
    first = [0.0] * n
    last = [0.0] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    times: list[list[float]] = [[] for _ in range(n)]
    done = threading.Event()
    remaining = [n]
    errors: list[str] = []
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)

    def sink_for(i: int) -> Any:
        def sink(events: list[TokenEvent]) -> None:  # one step's events of request i
            now = time.perf_counter()
            for event in events:
                if event.token_id is not None:
                    if not tokens[i]:
                        first[i] = now
                    tokens[i].append(event.token_id)
                    times[i].append(now)
                    last[i] = now
                if event.finish_reason is not None:
                    if event.finish_reason not in ("length", "stop"):
                        errors.append(f"{tag}-{i}: {event.finish_reason} {event.error}")
                    remaining[0] -= 1
                    if not remaining[0]:
                        done.set()

        return sink

    before = engine.stats()
    t_submit = time.perf_counter()
    for i, prompt in enumerate(prompts):
        key = conversation_keys[i] if conversation_keys else None
        engine.submit(GenerationRequest(f"{tag}-{i}", prompt, params, conversation_key=key), sink_for(i))
    if not done.wait(timeout=3600):
        raise RuntimeError("our engine did not finish within an hour")
    if errors:
        raise RuntimeError("; ".join(errors))
    after = engine.stats()
    return Round(
        t_submit,
        first,
        last,
        tokens,
        times,
        prompt_computed=after.prompt_tokens_computed - before.prompt_tokens_computed,
        prompt_reused=after.prompt_tokens_reused - before.prompt_tokens_reused,
        extra={"max_decode_batch": after.max_decode_batch},
    )


def run_mlxlm(
    model: Any,
    prompts: list[list[int]],
    gen: int,
    args: argparse.Namespace,
    tokenizer: Any = None,
    caches: list[Any] | None = None,
    all_tokens: list[list[int]] | None = None,
) -> Round:
    """One round through a fresh BatchGenerator; prompts are full prompts, or only the new tokens when
    caches (mlx-lm prompt caches covering all_tokens) are given."""
    from mlx_lm.generate import BatchGenerator

    n = len(prompts)
    gen_batch = BatchGenerator(
        model,
        max_tokens=gen,
        completion_batch_size=max(args.completion_batch, n),
        prefill_batch_size=args.prefill_batch,
    )
    first = [0.0] * n
    last = [0.0] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    times: list[list[float]] = [[] for _ in range(n)]
    detoks = [tokenizer.detokenizer for _ in range(n)] if tokenizer is not None else None
    returned: list[Any] = [None] * n
    t_submit = time.perf_counter()
    uids = gen_batch.insert(prompts, max_tokens=[gen] * n, caches=caches, all_tokens=all_tokens)
    index = {uid: i for i, uid in enumerate(uids)}
    remaining = n
    try:
        while remaining:
            responses = gen_batch.next_generated()
            now = time.perf_counter()
            if not responses:
                raise RuntimeError("mlx-lm's BatchGenerator ran out of work with requests unfinished")
            for r in responses:
                i = index[r.uid]
                if not tokens[i]:
                    first[i] = now
                tokens[i].append(int(r.token))
                times[i].append(now)
                last[i] = now
                if detoks is not None:
                    detoks[i].add_token(int(r.token))
                    _ = detoks[i].last_segment
                if r.finish_reason is not None:
                    if detoks is not None:
                        detoks[i].finalize()
                    returned[i] = (r.prompt_cache, list(r.all_tokens))
                    remaining -= 1
    finally:
        gen_batch.close()
    computed = sum(len(p) for p in prompts)
    reused = sum(len(t) for t in all_tokens) if all_tokens else 0
    return Round(
        t_submit, first, last, tokens, times, prompt_computed=computed, prompt_reused=reused, extra={"caches": returned}
    )


# -- memory-bandwidth bound --------------------------------------------------------------------------
@dataclass
class BandwidthBound:
    """What one decode step must read from memory, and how fast this device reads it."""

    bytes_per_s: float  # measured: a large array copied (bytes read + bytes written) per second
    weight_bytes: int  # read once per step whatever the batch: every weight matrix, the LM head included
    kv_bytes_per_token: int  # K and V of one token over all layers, read once per step per cached token

    def tokens_per_s(self, batch: int, context: float) -> float:
        """Upper bound on decode tok/s for `batch` sequences holding `context` cached tokens on average."""
        step_bytes = self.weight_bytes + batch * context * self.kv_bytes_per_token
        return batch * self.bytes_per_s / step_bytes


def measure_bandwidth(gib: float = 1.0, runs: int = 10) -> float:
    """Bytes per second of an elementwise copy of a `gib`-GiB float32 array (read + write counted)."""
    a = mx.random.uniform(shape=(int(gib * (1 << 30)) // 4,))
    mx.eval(a)
    best = math.inf
    for _ in range(runs + 2):
        t = time.perf_counter()
        mx.eval(a + 1.0)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


def bandwidth_bound(model: Any) -> BandwidthBound:
    args = model.args
    params = dict(_flat(model.parameters()))
    tied = not any(k.startswith("lm_head") for k in params)
    # an untied input embedding is read a row per token, not whole; a tied one is the LM head's matrix
    weight_bytes = sum(v.nbytes for k, v in params.items() if tied or "embed_tokens" not in k)
    layers = len(model.layers)
    kv_heads = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    itemsize = next(v.dtype.size for v in params.values() if mx.issubdtype(v.dtype, mx.floating))
    return BandwidthBound(measure_bandwidth(), weight_bytes, 2 * layers * kv_heads * head_dim * itemsize)


# -- scenarios --------------------------------------------------------------------------------------
def random_prompts(rng: np.random.Generator, n: int, length: int, vocab: int) -> list[list[int]]:
    low = min(100, vocab // 2)  # skip the low ids, where special tokens usually live
    return [rng.integers(low, vocab, size=length).tolist() for _ in range(n)]


def agreement(a: Round, b: Round) -> float:
    return sum(x == y for x, y in zip(a.tokens, b.tokens)) / len(a.tokens)


def batch_scenario(
    engine: Engine,
    model: Any,
    tok: Any,
    args: argparse.Namespace,
    rng: np.random.Generator,
    bound: BandwidthBound | None,
) -> list[str]:
    vocab = vocab_size(model)
    detok = tok if args.mlxlm_detok else None
    lines = []
    bound_lines = []
    if bound is not None:
        bound_lines = [
            f"memory-bandwidth bound: {bound.weight_bytes / 1e6:.1f} MB of weights + "
            f"{bound.kv_bytes_per_token / 1e3:.1f} kB of KV per cached token read per step, at "
            f"{bound.bytes_per_s / 1e9:.0f} GB/s (copy of 1 GiB, read + write); mean context "
            f"{args.prompt_len + args.gen_len / 2:.0f} tokens",
            f"{'batch':>5} | {'bound tok/s':>11} | {'ours':>6} {'mlx-lm':>6} (share of the bound, steady)",
        ]
    header = (
        f"{'batch':>5} | {'decode tok/s':>12} {'mlx-lm':>8} {'ours/mlx':>8} | {'steady tok/s':>12} {'mlx-lm':>8} "
        f"{'ours/mlx':>8} | {'e2e tok/s':>9} {'mlx-lm':>8} {'ours/mlx':>8} | {'TTFT ms':>8} {'mlx-lm':>8} | "
        f"{'wall s':>6} {'mlx-lm':>6} | {'agree':>5}"
    )
    lines += [header, "-" * len(header)]

    def warm_up(b: int) -> None:
        warm = random_prompts(rng, b, args.prompt_len, vocab)
        run_ours(engine, warm, args.warmup_gen, f"warm{b}")
        run_mlxlm(model, warm, args.warmup_gen, args, detok)

    if not args.warmup_each:
        warm_up(min(args.batches))
    for k, b in enumerate(args.batches):
        if args.warmup_each:
            warm_up(b)
        prompts = random_prompts(rng, b, args.prompt_len, vocab)
        t0 = time.perf_counter()
        ours_runs: list[Round] = []
        ref_runs: list[Round] = []
        for rep in range(args.repeat):
            if (k + rep) % 2 == 0:  # alternate which side goes first, so drift on a shared machine favours neither
                ours_runs.append(run_ours(engine, prompts, args.gen_len, f"b{b}r{rep}"))
                ref_runs.append(run_mlxlm(model, prompts, args.gen_len, args, detok))
            else:
                ref_runs.append(run_mlxlm(model, prompts, args.gen_len, args, detok))
                ours_runs.append(run_ours(engine, prompts, args.gen_len, f"b{b}r{rep}"))
        # each side's best round (by decode tok/s): noise on a shared machine only ever slows a round down
        ours = max(ours_runs, key=lambda r: r.decode_tps)
        ref = max(ref_runs, key=lambda r: r.decode_tps)
        assert ours.total == ref.total == b * args.gen_len, (ours.total, ref.total)

        def r(a: float, b: float) -> str:
            return f"{a / b:>8.2f}" if b == b and b > 0 and a == a else f"{'-':>8}"

        line = (
            f"{b:>5} | {ours.decode_tps:>12.1f} {ref.decode_tps:>8.1f} {r(ours.decode_tps, ref.decode_tps)} | "
            f"{ours.steady_tps:>12.1f} {ref.steady_tps:>8.1f} {r(ours.steady_tps, ref.steady_tps)} | "
            f"{ours.e2e_tps:>9.1f} {ref.e2e_tps:>8.1f} {r(ours.e2e_tps, ref.e2e_tps)} | "
            f"{ours.ttft_ms:>8.0f} {ref.ttft_ms:>8.0f} | {ours.wall:>6.2f} {ref.wall:>6.2f} | "
            f"{agreement(ours, ref):>5.2f}"
        )
        print(
            f"  [batch {b} measured in {time.perf_counter() - t0:.0f}s; our max decode batch so far "
            f"{ours.extra['max_decode_batch']}]",
            file=sys.stderr,
            flush=True,
        )
        lines.append(line)
        if bound is not None:
            cap = bound.tokens_per_s(b, args.prompt_len + args.gen_len / 2)
            bound_lines.append(f"{b:>5} | {cap:>11.1f} | {ours.steady_tps / cap:>6.1%} {ref.steady_tps / cap:>6.1%}")
    return lines + ([""] + bound_lines if bound_lines else [])


def multi_turn(engine: Engine, model: Any, tok: Any, args: argparse.Namespace, rng: np.random.Generator) -> list[str]:
    vocab = vocab_size(model)
    detok = tok if args.mlxlm_detok else None
    n, gen = args.agents, args.gen_len
    base = random_prompts(rng, n, args.prompt_len, vocab)
    news = [random_prompts(rng, n, args.turn_new, vocab) for _ in range(args.turns)]
    keys = [f"agent-{i}-{rng.integers(1 << 62)}" for i in range(n)]

    def drive(step: Any) -> tuple[float, int, int, list[list[list[int]]]]:
        prompts = [list(p) for p in base]
        state: Any = None
        computed = reused = 0
        outputs = []
        t0 = time.perf_counter()
        for turn in range(args.turns):
            r, state = step(turn, prompts, state)
            computed += r.prompt_computed
            reused += r.prompt_reused
            outputs.append(r.tokens)
            if turn + 1 < args.turns:
                prompts = [p + out + new for p, out, new in zip(prompts, r.tokens, news[turn + 1])]
        return time.perf_counter() - t0, computed, reused, outputs

    def ours_step(turn: int, prompts: list[list[int]], state: Any) -> tuple[Round, Any]:
        return run_ours(engine, prompts, gen, f"mt{turn}", conversation_keys=keys), None

    def mlx_step(turn: int, prompts: list[list[int]], state: Any) -> tuple[Round, Any]:
        return run_mlxlm(model, prompts, gen, args, detok), None

    def mlx_reuse_step(turn: int, prompts: list[list[int]], state: Any) -> tuple[Round, Any]:
        if state is None:
            r = run_mlxlm(model, prompts, gen, args, detok)
        else:
            caches, seen = state  # seen: tokens whose KV each cache holds
            deltas = [p[len(s) :] for p, s in zip(prompts, seen)]
            assert all(p[: len(s)] == s for p, s in zip(prompts, seen))
            r = run_mlxlm(model, deltas, gen, args, detok, caches=caches, all_tokens=seen)
        # a finished sequence's cache holds the tokens it reports (its last generated token included:
        # BatchGenerator feeds each token before returning it)
        caches = [c for c, _ in r.extra["caches"]]
        seen = [t for _, t in r.extra["caches"]]
        return r, (caches, seen)

    final_len = args.prompt_len + (args.turns - 1) * (gen + args.turn_new)
    total_prompt = sum(args.prompt_len + t * (gen + args.turn_new) for t in range(args.turns)) * n
    rows = [("ours (conversation keys)", drive(ours_step)), ("mlx-lm BatchGenerator (recompute)", drive(mlx_step))]
    if args.mlxlm_reuse:
        rows.append(("mlx-lm BatchGenerator + prompt cache", drive(mlx_reuse_step)))
    ours_wall = rows[0][1][0]
    lines = [
        f"{n} agents x {args.turns} turns: prompts {args.prompt_len} -> {final_len} tokens, +{args.turn_new} "
        f"new tokens a turn, {gen} generated a turn ({total_prompt} prompt tokens in all)"
    ]
    header = (
        f"{'side':<38} {'wall s':>7} {'ours/this':>9} {'prompt computed':>15} {'reused':>7} "
        f"{'computed vs ours':>16} {'agree':>5}"
    )
    lines += [header, "-" * len(header)]
    ours_computed = rows[0][1][1]
    for name, (wall, computed, reused, outputs) in rows:
        same = sum(a == b for ta, tb in zip(rows[0][1][3], outputs) for a, b in zip(ta, tb))
        lines.append(
            f"{name:<38} {wall:>7.2f} {ours_wall / wall:>9.2f} {computed:>15} {reused:>7} "
            f"{computed / max(ours_computed, 1):>15.2f}x {same / (n * args.turns):>5.2f}"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="an MLX model directory (default: the cached SmolLM2-135M-Instruct)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random weights in this model's shape")
    src.add_argument("--random-weights", metavar="CONFIG_JSON", help="random weights for this config.json")
    cache_location.add_cache_dir_argument(p)
    p.add_argument("--dtype", default="auto", help="random weights only: auto = bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument(
        "--warmup-gen",
        type=int,
        default=None,
        help="tokens per warm-up round (default: --gen-len on a GPU, min(--gen-len, 8) on the CPU)",
    )
    p.add_argument(
        "--warmup-each",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a warm-up round per side before every batch size (default: on a GPU; on the CPU one "
        "round per side before the first)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds per side and batch size; each side's best round is reported (default %(default)s)",
    )
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--turn-new", type=int, default=16, help="new tokens a turn adds (default %(default)s)")
    p.add_argument("--skip-batch", action="store_true", help="only the multi-turn scenario")
    p.add_argument("--skip-multi-turn", action="store_true", help="only the batch scenario")
    p.add_argument(
        "--mlxlm-reuse",
        action="store_true",
        help="multi-turn: also mlx-lm with the prompt caches its finished turns return",
    )
    p.add_argument("--mlxlm-detok", action="store_true", help="mlx-lm side detokenizes every token too")
    p.add_argument("--block-size", type=int, default=16, help="our KV block size (default %(default)s)")
    p.add_argument("--kv-blocks", type=int, default=None, help="our KV pool size in blocks (default: sized to fit)")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="our prompt tokens per step while nothing decodes (default: the engine's, 512 on a CPU, 2048 on a GPU)",
    )
    p.add_argument(
        "--decoding-prefill-chunk",
        type=int,
        default=None,
        help="our prompt tokens per step while streamed sequences decode (every request here is "
        "streamed; default: the engine's, 64 on a CPU, 2048 on a GPU; the server's "
        "--decoding-prefill-chunk). A batch submitted at once is "
        "admitted this many prompt tokens a step once its first rows decode: on a CPU, 512 "
        "gives the throughput figure, 64 the interactive default's",
    )
    p.add_argument("--prefill-batch", type=int, default=8, help="mlx-lm prefill_batch_size (default: mlx-lm's, 8)")
    p.add_argument(
        "--completion-batch",
        type=int,
        default=32,
        help="mlx-lm completion_batch_size, raised to the batch (default: mlx-lm's, 32)",
    )
    p.add_argument(
        "--output-thread",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="our token events on their own thread (default: the engine's, on a GPU)",
    )
    p.add_argument(
        "--bandwidth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print the memory-bandwidth bound of each batch size (default: on a GPU)",
    )
    p.add_argument(
        "--exact-cpu-layers",
        action="store_true",
        help="on a CPU, our engine runs mlx-lm's modules too (as the server's --exact-cpu-layers)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    args.warmup_gen = args.warmup_gen or (args.gen_len if on_gpu else min(args.gen_len, 8))
    if args.warmup_each is None:
        args.warmup_each = on_gpu

    model, tok, desc = load_models(args)
    private = materialize_private_arrays(model)
    our_model, layers = engine_model(model, args.exact_cpu_layers)
    materialize_private_arrays(our_model)
    rng = np.random.default_rng(args.seed)
    bs = args.block_size
    longest_turn = args.prompt_len + (args.turns - 1) * (args.gen_len + args.turn_new) + args.gen_len + 1
    num_blocks = args.kv_blocks or (
        max(
            max(args.batches) * -(-(args.prompt_len + args.gen_len + 1) // bs), 3 * args.agents * -(-longest_turn // bs)
        )
        + 64
    )
    max_seqs = max(SchedulerConfig().max_num_seqs, max(args.batches), args.agents)
    engine = Engine(
        our_model,
        tok,
        EngineConfig(
            block_size=bs,
            num_blocks=num_blocks,
            output_thread=args.output_thread,
            scheduler=SchedulerConfig(
                max_num_seqs=max_seqs,
                prefill_chunk=args.prefill_chunk,
                decoding_prefill_chunk=args.decoding_prefill_chunk,
            ),
        ),
    )
    engine.start()
    args.prefill_chunk = engine.config.scheduler.prefill_chunk
    args.decoding_prefill_chunk = engine.config.scheduler.decoding_prefill_chunk
    print(f"mlx {mx.__version__}  device {mx.default_device()}  model {desc}")
    print(
        f"ours: {layers}, block_size {bs}, {num_blocks} blocks, max_num_seqs {max_seqs}, prefill_chunk "
        f"{args.prefill_chunk} ({args.decoding_prefill_chunk} while decoding), output thread {engine.output.threaded}; mlx-lm: prefill_batch_size {args.prefill_batch}, completion_batch_size "
        f"max({args.completion_batch}, batch); mlx-lm detokenizes: {args.mlxlm_detok}"
    )
    print(
        f"prompt {args.prompt_len} tokens, {args.gen_len} generated (ignore EOS), greedy; warm-up: one round per "
        f"side {'before every batch size' if args.warmup_each else 'before the first batch size'} "
        f"({args.warmup_gen} tokens)"
    )
    if private:
        print(
            f"note: evaluated {len(private)} private module arrays ({', '.join(private[:2])}{', ...' if len(private) > 2 else ''}) "
            "before starting the engine: without that our engine thread fails on this model with "
            "'There is no Stream(cpu, 0) in current thread'"
        )
    print(flush=True)
    try:
        if not args.skip_batch:
            bound = bandwidth_bound(model) if (on_gpu if args.bandwidth is None else args.bandwidth) else None
            for line in batch_scenario(engine, model, tok, args, rng, bound):
                print(line, flush=True)
            print(
                "decode tok/s: (tokens - 1 per request) / (first token -> last token of the batch); steady: tokens "
                "while every request decodes / (last first token -> first last token); e2e: all tokens / "
                "(submission -> last token); TTFT: mean submission -> first token; agree: share of requests "
                "with identical greedy tokens"
            )
            print(flush=True)
        if not args.skip_multi_turn:
            for line in multi_turn(engine, model, tok, args, rng):
                print(line, flush=True)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
