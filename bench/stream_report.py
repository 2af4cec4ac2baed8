"""Statistics of one side's streams and the printed report of bench/server_streams.py (tables, ratios, targets).

Definitions (the same for every side): aggregate tokens/s = all completion tokens / (first submission
-> last chunk); TTFT = the request's submission (when its client began sending it) -> first chunk with
content; send p95 = how long after the round's start the clients began sending (their own delay);
inter-token = gaps between content chunks over the request's mean tokens per chunk, pooled over all
requests; errors = requests that failed or got fewer than the asked tokens. Targets (issue #17, on the H100): at 128 and 256 streams
aggregate >= 0.9x the engine alone and TTFT p50 <= 2x the engine's + 50 ms; at 1 stream aggregate
>= 0.95x the engine.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from stream_clients import Stream

NAMES = {
    "ours": "mlx-dropin",
    "thread": "ours, thread",
    "engine": "engine alone",
    "mlxlm": "mlx_lm.server",
    "split": "ours, split",
}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else math.nan


WAVE_GAP = 0.008  # seconds without a first token that separate two waves


def first_token_waves(records: list[Stream]) -> list[tuple[float, int]]:
    """When the requests' first tokens arrived, after the round's start, grouped into waves (ms, requests): each
    wave is an engine step that finished prefills. Under a burst it shows how admission fed the engine: the
    engine alone gets every request at once; a server gets them as it admits them."""
    if not records:
        return []
    start = min(r.start for r in records)
    firsts = sorted(r.chunk_times[0] - start for r in records if r.chunk_times)
    waves: list[tuple[float, int]] = []
    for i, t in enumerate(firsts):
        if waves and t - firsts[i - 1] <= WAVE_GAP:
            waves[-1] = (waves[-1][0], waves[-1][1] + 1)
        else:
            waves.append((t * 1e3, 1))
    return waves


def side_stats(records: list[Stream], gen_tokens: int) -> dict[str, Any]:
    """Aggregate tokens/s, TTFT and inter-token percentiles (ms), tokens per chunk, errors, for one round."""
    starts = [r.start for r in records if r.chunk_times]
    lasts = [r.chunk_times[-1] for r in records if r.chunk_times]
    tokens = sum(r.completion_tokens for r in records)
    chunks = sum(len(r.chunk_times) for r in records)
    span = max(lasts) - min(starts) if lasts else math.nan
    ttfts = [t for r in records if (t := r.ttft) is not None]
    gaps = [g for r in records for g in r.inter_token_gaps()]
    failed = [r for r in records if r.error or r.completion_tokens < gen_tokens]
    return {
        "requests": len(records),
        "tokens": tokens,
        "span_s": span,
        "aggregate_tps": tokens / span if span and span > 0 else math.nan,
        "ttft_p50_ms": _pct(ttfts, 50),
        "ttft_p95_ms": _pct(ttfts, 95),
        "send_p95_ms": _pct([r.send_delay for r in records], 95),
        "itl_p50_ms": _pct(gaps, 50),
        "itl_p95_ms": _pct(gaps, 95),
        "tokens_per_chunk": tokens / chunks if chunks else math.nan,
        "first_token_waves": first_token_waves(records),
        "prompt_tokens_mean": float(np.mean([r.prompt_tokens for r in records])) if records else math.nan,
        "errors": len(failed),
        "retries": sum(r.retries for r in records),
        "first_error": next((r.error for r in failed if r.error), None)
        or (f"{failed[0].completion_tokens} of {gen_tokens} tokens" if failed else None),
    }


def best_runs(runs: list[dict[int, dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """Per N, the run with the highest aggregate tokens/s (and how many runs there were, and their spread)."""
    best: dict[int, dict[str, Any]] = {}
    for n in sorted({n for run in runs for n in run}):
        of_n = [run[n] for run in runs if n in run]
        top = max(of_n, key=lambda s: s["aggregate_tps"] if s["aggregate_tps"] == s["aggregate_tps"] else -1.0)
        best[n] = {**top, "runs": len(of_n), "aggregate_tps_all": [s["aggregate_tps"] for s in of_n]}
    return best


def waves(stats: dict[str, dict[int, dict[str, Any]]], streams: list[int], most: int = 8) -> list[str]:
    """First-token waves (ms after the round's start: requests) for rounds of several streams."""
    lines = []
    for n in streams:
        for side, by_n in stats.items():
            s = by_n.get(n)
            if s is None or n < 2 or not s.get("first_token_waves"):
                continue
            shown = s["first_token_waves"][:most]
            rest = len(s["first_token_waves"]) - len(shown)
            lines.append(
                f"first tokens, {NAMES[side]} N={n}: "
                + ", ".join(f"{ms:.0f} ms: {count}" for ms, count in shown)
                + (f" (+{rest} more waves)" if rest > 0 else "")
            )
    return lines


def _ratio(a: float, b: float) -> float:
    return a / b if b == b and b and a == a else math.nan


def table(stats: dict[str, dict[int, dict[str, Any]]], streams: list[int]) -> list[str]:
    header = (
        f"{'side':<14} {'N':>4} | {'tok/s':>9} | {'TTFT p50':>8} {'p95':>8} | {'ITL p50':>7} {'p95':>7} | "
        f"{'tok/chunk':>9} | {'prompt':>6} | {'send p95':>8} | {'errors':>6} {'retries':>7}"
    )
    lines = [header, "-" * len(header)]
    for n in streams:
        for side, by_n in stats.items():
            s = by_n.get(n)
            if s is None:
                continue
            lines.append(
                f"{NAMES[side]:<14} {n:>4} | {s['aggregate_tps']:>9.1f} | {s['ttft_p50_ms']:>8.0f} "
                f"{s['ttft_p95_ms']:>8.0f} | {s['itl_p50_ms']:>7.1f} {s['itl_p95_ms']:>7.1f} | "
                f"{s['tokens_per_chunk']:>9.2f} | {s['prompt_tokens_mean']:>6.0f} | {s.get('send_p95_ms', 0.0):>8.0f} | "
                f"{s['errors']:>6} {s['retries']:>7}"
                + (f"  ({s['first_error']})" if s["first_error"] else "")
                + (
                    f"  [runs: {' / '.join(f'{x:.0f}' for x in s['aggregate_tps_all'])}]"
                    if s.get("runs", 1) > 1
                    else ""
                )
            )
    return lines


def ratios(stats: dict[str, dict[int, dict[str, Any]]], streams: list[int]) -> list[str]:
    lines = []
    for mine, ref in (("ours", "engine"), ("ours", "mlxlm"), ("thread", "engine"), ("split", "ours")):
        ours = stats.get(mine, {})
        if ref not in stats or not ours:
            continue
        lines.append(
            f"{NAMES[mine]} / {NAMES[ref]}: "
            + "; ".join(
                f"N={n}: aggregate {_ratio(ours[n]['aggregate_tps'], stats[ref][n]['aggregate_tps']):.2f}x, "
                f"TTFT p50 {_ratio(ours[n]['ttft_p50_ms'], stats[ref][n]['ttft_p50_ms']):.2f}x"
                for n in streams
                if n in ours and n in stats[ref]
            )
        )
    return lines


def targets(stats: dict[str, dict[int, dict[str, Any]]], streams: list[int]) -> list[str]:
    """The issue's targets as PASS / FAIL lines (needs ours and the engine alone)."""
    ours, engine = stats.get("ours", {}), stats.get("engine", {})
    lines = []
    for n in streams:
        if n not in ours or n not in engine:
            continue
        o, e = ours[n], engine[n]
        checks = []
        if n in (128, 256):
            checks.append(("aggregate >= 0.9x engine", o["aggregate_tps"], 0.9 * e["aggregate_tps"], ">="))
            checks.append(("TTFT p50 <= 2x engine + 50 ms", o["ttft_p50_ms"], 2 * e["ttft_p50_ms"] + 50, "<="))
        if n == 1:
            checks.append(("aggregate >= 0.95x engine", o["aggregate_tps"], 0.95 * e["aggregate_tps"], ">="))
        for name, value, bound, op in checks:
            ok = value >= bound if op == ">=" else value <= bound
            lines.append(f"{'PASS' if ok else 'FAIL'}  N={n}: {name}: {value:.1f} {op} {bound:.1f}")
        if o["errors"]:
            lines.append(f"FAIL  N={n}: {o['errors']} of our requests failed or came short")
    return lines


def report(stats: dict[str, dict[int, dict[str, Any]]], streams: list[int]) -> list[str]:
    lines = ["", *table(stats, streams), ""]
    lines += waves(stats, streams) + [""]
    lines += ratios(stats, streams)
    goal = targets(stats, streams)
    if goal:
        lines += ["", "targets (issue #17; they apply on the H100):", *goal]
    lines += [
        "",
        "tok/s: all completion tokens / (first submission -> last chunk); TTFT: the request's submission (its client "
        "began sending it) -> first content chunk (ms); ITL: gap between content chunks / the request's tokens per "
        "chunk (ms); prompt: mean prompt tokens (usage; the engine side's own count); send p95: ms after the round's "
        "start the clients began sending (their own delay); errors: failed or short requests; retries: dropped "
        "connections retried",
    ]
    return lines
