"""Per-step cost of the paged KV cache's bookkeeping, next to a contiguous cache and the seed design.

For one sequence of ``blocks x block_tokens`` tokens of context in a model with ``layers`` layers,
one decode step in our design (server/engine/paged_cache.py) does:

  (a) layout  StepLayout([n-1], 1, [block_table], block_size): the numpy slot tables, moved into
              mx arrays (once per step, shared by every layer);
  (b) read    every layer's K and V gathered from the slot pool by the read slots
              (``pool[read_slots].transpose(0, 2, 1, 3)``: what ``update_and_fetch`` returns);
  (c) write   one new token's K and V scattered into every layer's pool (``pool[write_slots] = kv``:
              what prefill does per token; decode steps write only their rows, and "write-back" copies a
              sequence's last WRITE_BACK_EVERY columns from its row into the pool, as the engine does
              every WRITE_BACK_EVERY steps and when the sequence finishes);
  (d) step    (b)+(c) through the real ``PagedLayerCache.update_and_fetch`` for every layer.
  (e) block gather / load: once per request, when a sequence joins decoding, its blocks are
              gathered whole into decode-row layout (server/engine/block_gather.py: one CUDA kernel on
              NVIDIA GPUs, MLX gather + transpose elsewhere) and copied into its decode row
              (``DecodeRows._load``, server/engine/decode_rows.py): "block gather" is the gather alone,
              "load" the real ``_load`` (gather + copy, or on CUDA one kernel writing
              the whole table when the loaded rows fill it, as a lone request's row does).

References, measured the same way in the same run:

  contiguous  mlx-lm's KVCache: one pre-allocated (1, H, cap, D) array per layer; read is
              ``keys[..., :n, :]`` (a view), write is a slice assignment of one token, step is the
              real ``KVCache.update_and_fetch``.
  seed        per-block (1, H, block_tokens, D) arrays: "reconstruct" concatenates a sequence's
              blocks into one contiguous cache (every layer, K and V); "extract" slices the
              contiguous cache back into blocks (as views, and as copies with mx.contiguous).
              The seed pays these per request (admission / finish), then decodes contiguously.

Every measurement forces evaluation with mx.eval and is timed with perf_counter; p50/p95/p99 over
--runs runs after --warmup warm-ups. On the CPU a per-operation time cap (--time-cap, 0 = none)
lowers the number of runs for the big configurations; the table prints the runs actually taken.

    .venv/bin/python bench/cache_ops.py                      # CPU defaults (capped), ~4.5 minutes on 2 cores
    .venv/bin/python bench/cache_ops.py --time-cap 0         # the full 100 runs everywhere
    .venv/bin/python bench/cache_ops.py --configs 8x30 --kv-heads 4 --head-dim 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402

import server  # noqa: E402,F401  (loads OpenBLAS before mlx.core)
from server.engine import SamplingParams  # noqa: E402
from server.engine.block_gather import gather_block_rows, uses_kernel  # noqa: E402
from server.engine.decode_rows import DecodeRows  # noqa: E402
from server.engine.engine import WRITE_BACK_EVERY  # noqa: E402
from server.engine.paged_cache import KVShape, KVStore, StepLayout, step_caches  # noqa: E402
from server.engine.sequence import Sequence  # noqa: E402

DEFAULT_CONFIGS = "1x12,4x24,8x30,32x48"


# -- timing ----------------------------------------------------------------------------------------
@dataclass
class Timing:
    p50: float
    p95: float
    p99: float
    runs: int

    @staticmethod
    def of(samples: list[float]) -> Timing:
        ms = np.asarray(samples) * 1e3
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return Timing(float(p50), float(p95), float(p99), len(samples))


def measure(fn: Callable[[], object], args: argparse.Namespace, setup: Callable[[], None] | None = None) -> Timing:
    """Time fn() (which must leave nothing unevaluated); setup() runs untimed before each call."""

    def once() -> float:
        if setup is not None:
            setup()
        mx.synchronize()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    warmup, runs = args.warmup, args.runs
    first = once()
    if args.time_cap > 0:  # keep one operation near time_cap seconds on slow devices
        affordable = int(args.time_cap / max(first, 1e-6))
        runs = max(min(runs, affordable), args.min_runs)
        warmup = max(1, min(warmup, runs // 5))  # the first run counts as one
    for _ in range(warmup - 1):
        once()
    return Timing.of([once() for _ in range(runs)])


# -- the three designs -----------------------------------------------------------------------------
def bench_ours(
    blocks: int, layers: int, args: argparse.Namespace, dtype: mx.Dtype, rng: np.random.Generator
) -> dict[str, Timing]:
    bs = args.our_block_size
    n = blocks * args.block_tokens
    seq_blocks = -(-n // bs)
    pool_blocks = seq_blocks + max(1, int(seq_blocks * args.pool_extra))
    H, D = args.kv_heads, args.head_dim
    shape = KVShape(layers, (H,) * layers, (D,) * layers, (D,) * layers, dtype)
    store = KVStore(shape, pool_blocks, bs)
    # random contents (zeros could be special-cased by a backend), sequence blocks scattered in the pool
    store.keys = [mx.random.normal(k.shape).astype(dtype) for k in store.keys]
    store.values = [mx.random.normal(v.shape).astype(dtype) for v in store.values]
    mx.eval(store.keys, store.values)
    table = [int(b) for b in rng.permutation(pool_blocks)[:seq_blocks]]
    k_new = mx.random.normal((1, H, 1, D)).astype(dtype)
    v_new = mx.random.normal((1, H, 1, D)).astype(dtype)
    mx.eval(k_new, v_new)

    def layout() -> StepLayout:
        lay = StepLayout([n - 1], 1, [table], bs)
        mx.eval(lay.write_slots, lay.read_slots)
        return lay

    lay = layout()
    out: dict[str, Timing] = {"layout": measure(layout, args)}

    def read() -> None:
        outs = [pool[lay.read_slots].transpose(0, 2, 1, 3) for pool in (*store.keys, *store.values)]
        mx.eval(outs)

    def write() -> None:
        k = k_new.transpose(0, 2, 1, 3).reshape(1, H, -1)
        v = v_new.transpose(0, 2, 1, 3).reshape(1, H, -1)
        for layer in range(layers):
            k_pool, v_pool = store.keys[layer], store.values[layer]
            k_pool[lay.write_slots] = k
            v_pool[lay.write_slots] = v
        mx.eval(store.keys, store.values)

    def step() -> None:
        outs = [c.update_and_fetch(k_new, v_new) for c in step_caches(store, lay)]
        mx.eval(outs, store.keys, store.values)

    blocks_mx = mx.array([table])
    rows = DecodeRows(store)
    rows._grow(1, n)

    def read_blocks() -> None:
        outs = gather_block_rows([*store.keys, *store.values], blocks_mx, bs)
        mx.eval(outs)

    def load_rows() -> None:  # what DecodeRows does once per request joining the decode batch
        rows._load([0], [table], [n])
        mx.eval(rows.keys, rows.values)

    # the way back: decode steps write the rows only; every WRITE_BACK_EVERY steps (and at its finish) a
    # sequence's newest columns are written back into its pool slots
    seq = Sequence("bench", 0, [1] * n, SamplingParams(max_tokens=1), None, None, 1)  # type: ignore[arg-type]
    seq.block_ids = table
    rows.assign([seq], [n])
    back = min(WRITE_BACK_EVERY, n)

    def unpool() -> None:
        rows.pooled[rows.row_of[("bench", 0)]] = n - back

    def write_back() -> None:
        rows.write_back([seq], [n])
        mx.eval(store.keys, store.values)

    out["read"] = measure(read, args)
    out["read_blocks"] = measure(read_blocks, args)
    out["load_rows"] = measure(load_rows, args)
    out["write"] = measure(write, args)
    out["write_back"] = measure(write_back, args, setup=unpool)
    out["step"] = measure(step, args)
    return out


def bench_contiguous(blocks: int, layers: int, args: argparse.Namespace, dtype: mx.Dtype) -> dict[str, Timing]:
    n = blocks * args.block_tokens
    cap = -(-n // KVCache.step) * KVCache.step  # what mlx-lm's KVCache has allocated at n tokens
    H, D = args.kv_heads, args.head_dim
    caches = []
    for _ in range(layers):
        c = KVCache()
        c.keys = mx.random.normal((1, H, cap, D)).astype(dtype)
        c.values = mx.random.normal((1, H, cap, D)).astype(dtype)
        c.offset = n - 1
        mx.eval(c.keys, c.values)
        caches.append(c)
    k_new = mx.random.normal((1, H, 1, D)).astype(dtype)
    v_new = mx.random.normal((1, H, 1, D)).astype(dtype)
    mx.eval(k_new, v_new)

    def read() -> None:
        outs = [(c.keys[..., :n, :], c.values[..., :n, :]) for c in caches]
        mx.eval(outs)

    def write() -> None:
        for c in caches:
            c.keys[..., n - 1 : n, :] = k_new
            c.values[..., n - 1 : n, :] = v_new
        mx.eval([(c.keys, c.values) for c in caches])

    def reset() -> None:
        for c in caches:
            c.offset = n - 1

    def step() -> None:
        outs = [c.update_and_fetch(k_new, v_new) for c in caches]
        mx.eval(outs, [(c.keys, c.values) for c in caches])

    out = {"read": measure(read, args), "write": measure(write, args), "step": measure(step, args, setup=reset)}
    caches.clear()  # free the contiguous caches before the next size
    return out


def bench_seed(blocks: int, layers: int, args: argparse.Namespace, dtype: mx.Dtype) -> dict[str, Timing]:
    T = args.block_tokens
    H, D = args.kv_heads, args.head_dim
    k_blocks = [[mx.random.normal((1, H, T, D)).astype(dtype) for _ in range(blocks)] for _ in range(layers)]
    v_blocks = [[mx.random.normal((1, H, T, D)).astype(dtype) for _ in range(blocks)] for _ in range(layers)]
    mx.eval(k_blocks, v_blocks)

    def reconstruct() -> list[mx.array]:
        outs = [mx.concatenate(b, axis=2) for b in (*k_blocks, *v_blocks)]
        mx.eval(outs)
        return outs

    out = {"reconstruct": measure(reconstruct, args)}
    k_blocks.clear()
    v_blocks.clear()
    gc.collect()
    mx.clear_cache()
    contiguous = [mx.random.normal((1, H, blocks * T, D)).astype(dtype) for _ in range(2 * layers)]
    mx.eval(contiguous)

    def extract_views() -> None:
        mx.eval([c[..., i * T : (i + 1) * T, :] for c in contiguous for i in range(blocks)])

    def extract_copies() -> None:
        mx.eval([mx.contiguous(c[..., i * T : (i + 1) * T, :]) for c in contiguous for i in range(blocks)])

    out["extract_views"] = measure(extract_views, args)
    out["extract_copies"] = measure(extract_copies, args)
    contiguous.clear()
    return out


# -- report ----------------------------------------------------------------------------------------
def fmt(x: float) -> str:
    if x >= 100:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.3f}"
    return f"{x:.4f}"


def ratio(a: Timing, b: Timing | None) -> str:
    if b is None or b.p50 <= 0:
        return "-"
    r = a.p50 / b.p50
    if r < 0.01:
        return f"{r:.1e}x"
    return f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated BLOCKSxLAYERS (default %(default)s)")
    p.add_argument("--block-tokens", type=int, default=256, help="tokens per block (default %(default)s)")
    p.add_argument(
        "--our-block-size",
        type=int,
        default=None,
        help="block size of our slot pool (default: --block-tokens; the engine's default is 16)",
    )
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="auto", help="auto = bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument(
        "--time-cap",
        type=float,
        default=None,
        help="seconds per operation that lower --runs (default 3 on the CPU, 0 = none on a GPU)",
    )
    p.add_argument("--min-runs", type=int, default=3, help="runs kept whatever --time-cap says")
    p.add_argument(
        "--pool-extra",
        type=float,
        default=0.25,
        help="pool blocks beyond the sequence's, as a fraction of them (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    if args.time_cap is None:
        args.time_cap = 0.0 if on_gpu else 3.0
    args.our_block_size = args.our_block_size or args.block_tokens
    dtype = getattr(mx, "bfloat16" if on_gpu else "float32") if args.dtype == "auto" else getattr(mx, args.dtype)
    configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.configs.split(",")]
    rng = np.random.default_rng(args.seed)
    mx.random.seed(args.seed)

    print(
        f"mlx {mx.__version__}  device {mx.default_device()}  dtype {dtype}  "
        f"kv_heads {args.kv_heads} x head_dim {args.head_dim}  block_tokens {args.block_tokens}  "
        f"our block_size {args.our_block_size}  block gather "
        f"{'CUDA kernel' if uses_kernel(mx.zeros((1, args.kv_heads, args.head_dim), dtype)) else 'MLX ops'}"
    )
    print(
        f"runs {args.runs} after {args.warmup} warm-ups"
        + (f"; time cap {args.time_cap:g}s per operation (min {args.min_runs} runs)" if args.time_cap > 0 else "")
    )
    print()

    header = (
        f"{'config':<7} {'ctx':>6} {'op':<7} {'design':<34} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
        f"{'runs':>5} {'ours/contig':>12} {'ours/seed':>10}"
    )
    rows: list[str] = []
    for blocks, layers in configs:
        n = blocks * args.block_tokens
        mib = 2 * layers * n * args.kv_heads * args.head_dim * dtype.size / (1 << 20)
        t0 = time.perf_counter()
        ours = bench_ours(blocks, layers, args, dtype, rng)
        gc.collect(), mx.clear_cache()
        contig = bench_contiguous(blocks, layers, args, dtype)
        gc.collect(), mx.clear_cache()
        seed = bench_seed(blocks, layers, args, dtype)
        gc.collect(), mx.clear_cache()
        print(
            f"  measured {blocks}x{layers} ({n} tokens, {mib:.0f} MiB of K+V) in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
            flush=True,
        )
        first = [f"{blocks}x{layers}", str(n)]

        def row(
            op: str, design: str, t: Timing, vs_contig: Timing | None = None, vs_seed: Timing | None = None
        ) -> None:
            label, ctx = first if first else ("", "")
            first.clear()
            ratios = (ratio(t, vs_contig), ratio(t, vs_seed)) if (vs_contig or vs_seed) else ("", "")
            rows.append(
                f"{label:<7} {ctx:>6} {op:<7} {design:<34} {fmt(t.p50):>9} {fmt(t.p95):>9} {fmt(t.p99):>9} "
                f"{t.runs:>5} {ratios[0]:>12} {ratios[1]:>10}"
            )

        row("layout", "ours StepLayout (slot tables)", ours["layout"])
        row("read", "ours gather (K+V, all layers)", ours["read"], contig["read"], seed["reconstruct"])
        row("read", "ours block gather to rows (K+V)", ours["read_blocks"], contig["read"], seed["reconstruct"])
        row("load", "ours DecodeRows load (blocks -> row)", ours["load_rows"], None, seed["reconstruct"])
        row("read", "contiguous keys[..., :n, :]", contig["read"])
        row("read", "seed concat reconstruct", seed["reconstruct"])
        row("write", "ours scatter 1 token", ours["write"], contig["write"], seed["extract_copies"])
        row(
            "write",
            f"ours DecodeRows write-back {WRITE_BACK_EVERY} tok",
            ours["write_back"],
            None,
            seed["extract_copies"],
        )
        row("write", "contiguous slice-assign 1 token", contig["write"])
        row("write", "seed extract (slice views)", seed["extract_views"])
        row("write", "seed extract (mx.contiguous)", seed["extract_copies"])
        row(
            "step",
            "ours update_and_fetch (+layout)",
            _plus(ours["step"], ours["layout"]),
            contig["step"],
            _plus(seed["reconstruct"], seed["extract_copies"]),
        )
        row("step", "contiguous KVCache.update_and_fetch", contig["step"])
        rows.append("")

    print(header)
    print("-" * len(header))
    print("\n".join(rows).rstrip())
    print()
    print(
        "ratios compare p50s. read: ours/seed is our per-step gather over the seed's per-request concat; "
        "write: ours/seed is our per-step scatter over the seed's per-request extract (copies); step: ours "
        "(update_and_fetch + layout) over contiguous KVCache.update_and_fetch, and over reconstruct + extract. "
        "Slices in MLX are views: the contiguous read and the view extract copy nothing; "
        "concatenating a single block is a no-op (1xN configs)."
    )
    return 0


def _plus(a: Timing, b: Timing) -> Timing:
    """p50s add (an approximation for the tails: they are added too)."""
    return Timing(a.p50 + b.p50, a.p95 + b.p95, a.p99 + b.p99, min(a.runs, b.runs))


if __name__ == "__main__":
    raise SystemExit(main())
