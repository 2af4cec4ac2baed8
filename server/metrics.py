"""Prometheus metrics on a per-app CollectorRegistry (several apps in one process never clash).

Counted as things happen: HTTP requests by route template, method and status,
their latency, and for generation the time to first token, the time between
tokens and the tokens generated. Read at scrape time: each engine's
`stats()` (KV blocks, running and waiting sequences, prompt tokens computed
and reused), each embedding batcher's counters and the fine-tuning jobs by
status, so nothing has to push them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.request import TokenEvent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    """The app's metrics (app.state.metrics); `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("mlx_dropin_requests", "HTTP requests by route template, method and status",
                                ("route", "method", "status"), registry=r)
        self.latency = Histogram("mlx_dropin_request_duration_seconds", "HTTP request latency, to the last byte",
                                 ("route", "method"), buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("mlx_dropin_requests_in_flight", "HTTP requests being answered", registry=r)
        self.ttft = Histogram("mlx_dropin_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token", ("model",),
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("mlx_dropin_inter_token_latency_seconds", "Between two tokens of one sequence",
                             ("model",), buckets=ITL_BUCKETS, registry=r)
        self.generated = Counter("mlx_dropin_generated_tokens", "Tokens generated, by model", ("model",),
                                 registry=r)

    def watch(self, state: Any) -> None:
        """Read engines, batchers and fine-tuning jobs from the app's state at every scrape."""
        self.registry.register(_StateCollector(state))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def generation(self, model: str, started: float | None = None) -> TokenTimer:
        return TokenTimer(self, model, started if started is not None else time.perf_counter())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TokenTimer:
    """Times one generation's token events: TTFT once, then the gaps between each sequence's tokens."""

    def __init__(self, metrics: Metrics, model: str, started: float) -> None:
        self.metrics, self.model, self.started = metrics, model, started

    async def watch(self, events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
        ttft, itl, generated = (m.labels(self.model) for m in (self.metrics.ttft, self.metrics.itl,
                                                              self.metrics.generated))
        last: dict[int, float] = {}
        async with contextlib.aclosing(events):  # closing this closes the engine's stream (its abort)
            async for event in events:
                if event.token_id is not None:
                    now = time.perf_counter()
                    if not last:
                        ttft.observe(now - self.started)
                    previous = last.get(event.index)
                    if previous is not None:
                        itl.observe(now - previous)
                    last[event.index] = now
                    generated.inc()
                yield event


def timed(timer: TokenTimer | None, events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    """The engine's events, timed when the route gave the plan a timer."""
    return events if timer is None else timer.watch(events)


class _StateCollector(Collector):
    def __init__(self, state: Any) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        yield from _engine_metrics(self.state.registry.list())
        yield from _embedding_metrics(self.state.registry.list())
        yield _fine_tuning_jobs(self.state)


def _engine_metrics(models: list[Any]) -> Iterator[Metric]:
    blocks = GaugeMetricFamily("mlx_dropin_kv_blocks", "KV blocks by state (used, cached = free but still "
                               "holding reusable KV, free, pinned by conversations)", labels=("model", "state"))
    seqs = GaugeMetricFamily("mlx_dropin_sequences", "Sequences running or waiting for admission",
                             labels=("model", "state"))
    queue = GaugeMetricFamily("mlx_dropin_queue_depth", "Sequences waiting for KV blocks or a batch slot",
                              labels=("model",))
    prompt = CounterMetricFamily("mlx_dropin_prompt_tokens", "Prompt tokens computed or reused from cached KV",
                                 labels=("model", "source"))
    reuse = GaugeMetricFamily("mlx_dropin_prefix_reuse_ratio", "Prompt tokens reused / (computed + reused), "
                              "since start", labels=("model",))
    engine_tokens = CounterMetricFamily("mlx_dropin_engine_generated_tokens", "Tokens the engine sampled",
                                        labels=("model",))
    for served in models:
        engine = getattr(served, "engine", None)
        if served.kind != "chat" or engine is None:
            continue
        s = engine.stats()
        for name, value in (("used", s.blocks_used), ("cached", s.blocks_cached), ("free", s.blocks_free),
                            ("pinned", s.blocks_pinned)):
            blocks.add_metric([served.id, name], value)
        seqs.add_metric([served.id, "running"], s.running)
        seqs.add_metric([served.id, "waiting"], s.waiting)
        queue.add_metric([served.id], s.waiting)
        prompt.add_metric([served.id, "computed"], s.prompt_tokens_computed)
        prompt.add_metric([served.id, "reused"], s.prompt_tokens_reused)
        total = s.prompt_tokens_computed + s.prompt_tokens_reused
        reuse.add_metric([served.id], s.prompt_tokens_reused / total if total else 0.0)
        engine_tokens.add_metric([served.id], s.generated_tokens)
    yield from (blocks, seqs, queue, prompt, reuse, engine_tokens)


def _embedding_metrics(models: list[Any]) -> Iterator[Metric]:
    batches = CounterMetricFamily("mlx_dropin_embedding_batches", "Encoder calls made by the micro-batcher",
                                  labels=("model",))
    inputs = CounterMetricFamily("mlx_dropin_embedding_inputs", "Inputs embedded", labels=("model",))
    for served in models:
        batcher = getattr(served, "batcher", None)
        if batcher is not None:
            batches.add_metric([served.id], batcher.batches)
            inputs.add_metric([served.id], batcher.inputs)
    yield from (batches, inputs)


def _fine_tuning_jobs(state: Any) -> Metric:
    from server.finetune.jobs import ACTIVE, FINAL

    family = GaugeMetricFamily("mlx_dropin_fine_tuning_jobs", "Fine-tuning jobs by status", labels=("status",))
    counts = dict.fromkeys((*ACTIVE, *FINAL), 0)
    for job in state.fine_tuning.store.with_status(*counts):
        counts[job.status] = counts.get(job.status, 0) + 1
    for status, count in counts.items():
        family.add_metric([status], count)
    return family
