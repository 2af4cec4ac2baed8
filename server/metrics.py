"""Prometheus metrics on a per-app CollectorRegistry (several apps in one process never clash).

Counted as things happen: HTTP requests by route template, method and status,
their latency, and for generation the time to first token, the time between
tokens and the tokens generated. Read at scrape time: each engine's
`stats()` (KV blocks, running and waiting sequences, prompt tokens computed
and reused), each embedding batcher's counters, the fine-tuning jobs by
status and MLX's memory (active, cache, peak, limit: four reads of its
allocator's counters), so nothing has to push them.

/metrics may be open, so no label names a tenant: the operator's models keep
their ids, and every fine-tuned model (whose ``ft:<base>:<org>:<suffix>:<job>``
id names an organization) is counted under the one label ``fine-tuned``. The
engines behind that label come and go (adapters are unloaded when idle), so
their counters are carried over once an engine is gone and stay monotonic.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine import TokenEvent, mlx_memory
from server.finetune.jobs import ACTIVE, FINAL

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
FINE_TUNED = "fine-tuned"  # the one label of every tenant's fine-tuned model
FINE_TUNED_PREFIX = "ft:"
ENGINE_GAUGES = ("blocks_used", "blocks_cached", "blocks_free", "blocks_pinned", "running", "waiting")
ENGINE_COUNTERS = ("prompt_tokens_computed", "prompt_tokens_reused", "generated_tokens", "prefill_shapes_built")
BATCHER_COUNTERS = ("batches", "inputs")


def model_label(model: Any) -> str:
    """A model's metric label (a ServedModel or a model id): its id for the operator's models, "fine-tuned" for
    a tenant's (owned by a tenant, built on a base, or named ``ft:...``)."""
    model_id = model if isinstance(model, str) else model.id
    owned = not isinstance(model, str) and (model.owner is not None or model.base is not None)
    return FINE_TUNED if owned or model_id.startswith(FINE_TUNED_PREFIX) else model_id


class Metrics:
    """The app's metrics (app.state.metrics); `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mlx_dropin_requests",
            "HTTP requests by route template, method and status",
            ("route", "method", "status"),
            registry=r,
        )
        self.latency = Histogram(
            "mlx_dropin_request_duration_seconds",
            "HTTP request latency, to the last byte",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("mlx_dropin_requests_in_flight", "HTTP requests being answered", registry=r)
        self.ttft = Histogram(
            "mlx_dropin_time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            ("model",),
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "mlx_dropin_inter_token_latency_seconds",
            "Between two tokens of one sequence",
            ("model",),
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.generated = Counter("mlx_dropin_generated_tokens", "Tokens generated, by model", ("model",), registry=r)

    def watch(self, state: Any) -> None:
        """Read engines, batchers and fine-tuning jobs from the app's state at every scrape."""
        self.registry.register(_StateCollector(state))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def generation(self, model: Any, started: float | None = None) -> TokenTimer:
        """A timer for one generation of `model` (a ServedModel or its id), labelled by `model_label`."""
        return TokenTimer(self, model_label(model), started if started is not None else time.perf_counter())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TokenTimer:
    """Times one generation's token events: TTFT once, then the gaps between each sequence's tokens."""

    def __init__(self, metrics: Metrics, model: str, started: float) -> None:
        self.metrics, self.model, self.started = metrics, model, started

    async def watch(self, batches: AsyncGenerator[list[TokenEvent], None]) -> AsyncIterator[list[TokenEvent]]:
        """The batches, passed through, timed: the first token's delay once; per sequence, the gap since its
        last batch shared by the tokens in this one (what each token cost, when a reader takes several)."""
        ttft = self.metrics.ttft.labels(self.model)
        itl = self.metrics.itl.labels(self.model)
        generated = self.metrics.generated.labels(self.model)
        last: dict[int, float] = {}
        async with contextlib.aclosing(batches):  # closing this closes the engine's stream (its abort)
            async for events in batches:
                now = time.perf_counter()
                tokens: dict[int, int] = {}
                for event in events:
                    if event.token_id is not None:
                        tokens[event.index] = tokens.get(event.index, 0) + 1
                if tokens:
                    if not last:
                        ttft.observe(now - self.started)
                    for index, count in tokens.items():
                        previous = last.get(index)
                        if previous is not None:
                            gap = (now - previous) / count
                            for _ in range(count):
                                itl.observe(gap)
                        last[index] = now
                    generated.inc(sum(tokens.values()))
                yield events


def timed(timer: TokenTimer | None, batches: AsyncGenerator[list[TokenEvent], None]) -> AsyncIterator[list[TokenEvent]]:
    """The engine's event batches, timed when the route gave the plan a timer."""
    return batches if timer is None else timer.watch(batches)


class _Carried:
    """Counters per label that stay monotonic while the engines (or batchers) behind a label come and go: the last
    values of one that is gone (unloaded, replaced, or counting from zero again) are kept and added."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # scrapes run on the thread pool, possibly two at once
        self._seen: dict[str, tuple[int, str, dict[str, float]]] = {}  # model id -> (source, label, counters)
        self._gone: dict[str, dict[str, float]] = {}  # label -> counters of sources gone

    def totals(self, current: dict[str, tuple[int, str, dict[str, float]]]) -> dict[str, dict[str, float]]:
        """Per label, the counters of the sources in `current` (model id -> (id of the source, label, counters))
        plus those of every source gone since start."""
        with self._lock:
            for model_id, (source, label, last) in self._seen.items():
                now = current.get(model_id)
                if now is None or now[0] != source or any(now[2][k] < v for k, v in last.items()):
                    _add(self._gone.setdefault(label, {}), last)
            self._seen = dict(current)
            out = {label: dict(counters) for label, counters in self._gone.items()}
        for _, label, counters in current.values():
            _add(out.setdefault(label, {}), counters)
        return out


def _add(into: dict[str, float], counters: dict[str, float]) -> None:
    for name, value in counters.items():
        into[name] = into.get(name, 0) + value


class _StateCollector(Collector):
    def __init__(self, state: Any) -> None:
        self.state = state
        self.engines, self.batchers = _Carried(), _Carried()

    def collect(self) -> Iterator[Metric]:
        models = self.state.registry.list()
        yield from _engine_metrics(models, self.engines)
        yield from _embedding_metrics(models, self.batchers)
        yield _fine_tuning_jobs(self.state)
        yield _mlx_memory(models)
        yield from _world(self.state, models)


def _world(state: Any, models: list[Any]) -> Iterator[Metric]:
    """The ranks a model is split over (mlx.launch): their number and backend, and what each rank holds."""
    world = getattr(state, "world", None)
    size = GaugeMetricFamily(
        "mlx_dropin_world_size", "Ranks serving the split chat model (1: none)", labels=("backend",)
    )
    size.add_metric([world.backend if world is not None else "none"], world.size if world is not None else 1)
    yield size
    shards = GaugeMetricFamily(
        "mlx_dropin_model_shard_heads",
        "Attention and KV heads per layer each rank holds of a split model",
        labels=("model", "mode", "heads"),
    )
    for served in models:
        if served.shard is not None:
            shards.add_metric([model_label(served), served.shard.mode, "attention"], served.shard.attention_heads)
            shards.add_metric([model_label(served), served.shard.mode, "kv"], served.shard.kv_heads)
    yield shards
    layers = GaugeMetricFamily(
        "mlx_dropin_model_shard_layers",
        "Layers rank 0 runs of a model split by pipeline parallelism, and the model's total",
        labels=("model", "mode", "layers"),
    )
    for served in models:
        shard = served.shard
        if shard is not None and shard.layers is not None:
            layers.add_metric([model_label(served), shard.mode, "held"], shard.layers[1] - shard.layers[0])
            layers.add_metric([model_label(served), shard.mode, "total"], shard.num_layers)
    yield layers


def _engine_metrics(models: list[Any], carried: _Carried) -> Iterator[Metric]:
    blocks = GaugeMetricFamily(
        "mlx_dropin_kv_blocks",
        "KV blocks by state (used, cached = free but still holding reusable KV, free, pinned by conversations)",
        labels=("model", "state"),
    )
    seqs = GaugeMetricFamily(
        "mlx_dropin_sequences", "Sequences running or waiting for admission", labels=("model", "state")
    )
    queue = GaugeMetricFamily(
        "mlx_dropin_queue_depth", "Sequences waiting for KV blocks or a batch slot", labels=("model",)
    )
    prompt = CounterMetricFamily(
        "mlx_dropin_prompt_tokens", "Prompt tokens computed or reused from cached KV", labels=("model", "source")
    )
    reuse = GaugeMetricFamily(
        "mlx_dropin_prefix_reuse_ratio", "Prompt tokens reused / (computed + reused), since start", labels=("model",)
    )
    engine_tokens = CounterMetricFamily(
        "mlx_dropin_engine_generated_tokens", "Tokens the engine sampled", labels=("model",)
    )
    shapes = CounterMetricFamily(
        "mlx_dropin_prefill_shapes_built",
        "Padded prefill shapes first run while serving, not at start-up (on CUDA each builds an attention graph)",
        labels=("model",),
    )
    gauges: dict[str, dict[str, float]] = {}
    counters: dict[str, tuple[int, str, dict[str, float]]] = {}
    for served in models:
        engine = getattr(served, "engine", None)
        if served.kind != "chat" or engine is None:
            continue
        s, label = engine.stats(), model_label(served)
        _add(gauges.setdefault(label, {}), {name: getattr(s, name) for name in ENGINE_GAUGES})
        counters[served.id] = (id(engine), label, {name: getattr(s, name) for name in ENGINE_COUNTERS})
    for label, g in gauges.items():
        for name in ("used", "cached", "free", "pinned"):
            blocks.add_metric([label, name], g["blocks_" + name])
        seqs.add_metric([label, "running"], g["running"])
        seqs.add_metric([label, "waiting"], g["waiting"])
        queue.add_metric([label], g["waiting"])
    for label, c in carried.totals(counters).items():
        computed, reused = c["prompt_tokens_computed"], c["prompt_tokens_reused"]
        prompt.add_metric([label, "computed"], computed)
        prompt.add_metric([label, "reused"], reused)
        reuse.add_metric([label], reused / (computed + reused) if computed + reused else 0.0)
        engine_tokens.add_metric([label], c["generated_tokens"])
        shapes.add_metric([label], c["prefill_shapes_built"])
    yield from (blocks, seqs, queue, prompt, reuse, engine_tokens, shapes)


def _embedding_metrics(models: list[Any], carried: _Carried) -> Iterator[Metric]:
    batches = CounterMetricFamily(
        "mlx_dropin_embedding_batches", "Encoder calls made by the micro-batcher", labels=("model",)
    )
    inputs = CounterMetricFamily("mlx_dropin_embedding_inputs", "Inputs embedded", labels=("model",))
    counters = {
        served.id: (id(batcher), model_label(served), {name: getattr(batcher, name) for name in BATCHER_COUNTERS})
        for served in models
        if (batcher := getattr(served, "batcher", None)) is not None
    }
    for label, c in carried.totals(counters).items():
        batches.add_metric([label], c["batches"])
        inputs.add_metric([label], c["inputs"])
    yield from (batches, inputs)


def _fine_tuning_jobs(state: Any) -> Metric:
    family = GaugeMetricFamily("mlx_dropin_fine_tuning_jobs", "Fine-tuning jobs by status", labels=("status",))
    counts = dict.fromkeys((*ACTIVE, *FINAL), 0)
    for job in state.fine_tuning.store.with_status(*counts):
        counts[job.status] = counts.get(job.status, 0) + 1
    for status, count in counts.items():
        family.add_metric([status], count)
    return family


def _mlx_memory(models: list[Any]) -> Metric:
    """MLX's allocator, per process: arrays alive (active), freed buffers kept for reuse (cache), the most ever
    active (peak) and the limit past which it frees cached buffers first (limit). `process` is "server" for
    this one (only while it holds MLX weights: reading the allocator would start the device in a process
    that never uses it) and the model id for each engine process (as of its last stats, at most STATS_EVERY
    old)."""
    family = GaugeMetricFamily(
        "mlx_dropin_mlx_memory_bytes", "MLX memory in bytes, by process and kind", labels=("process", "kind")
    )
    if any(served.weights_here for served in models):
        for kind, value in mlx_memory().items():
            family.add_metric(["server", kind], value)
    for served in models:
        memory = getattr(served.engine, "memory", None)  # an engine process's, reported with its stats
        if memory:
            for kind, value in memory.items():
                family.add_metric([served.id, kind], value)
    return family
