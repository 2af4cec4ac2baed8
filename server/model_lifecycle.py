"""The served models' life: registered, started, stopped.

Building the registry has two stages. `prepare` fetches or converts every
model's files (may download, may take minutes on first start) and registers
them; `load` reads the weights and starts each one with `start_model`, which
the fine-tuning service also uses for a fine-tuned model's adapter. With
`--engine process` (the command's default) a base chat model's engine runs in
a process of its own (`EngineClient`): the weights load there, and this
process keeps only the tokenizer, until a fine-tuned adapter needs the base
weights here (`base_weights`). The server
answers /health during both, and /ready only after both. `unload` stops a
model's engine or batcher; `shutdown` stops them all.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from server.config import Settings
from server.embeddings.batcher import EmbeddingBatcher
from server.embeddings.causal_lm import CausalLMEncoder, load_embedding_model
from server.embeddings.encoder import Encoder
from server.engine import CoreSpec, Engine, EngineClient, EngineConfig, apply_memory_limits
from server.engine.world import World
from server.models.cache import ModelCache
from server.models.defaults import DEFAULTS, build_default
from server.models.loading import detect_kind, load_chat_model, load_chat_tokenizer, resolve_source
from server.registry import ModelRegistry, ServedModel

log = logging.getLogger(__name__)


def created_time(path: Path) -> int:
    """A base model's `created`: its directory's modification time, the same on every start."""
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return int(time.time())


def prepare(registry: ModelRegistry, settings: Settings) -> None:
    """Fetch/convert every configured model and register it (no weights loaded yet)."""
    cache = ModelCache(settings.cache_dir)
    for spec in settings.models:
        path = resolve_source(spec.source, cache, settings.offline)
        registry.add(ServedModel(id=spec.id, kind=detect_kind(path), path=path, created=created_time(path)))
    if settings.default_models:
        for default in DEFAULTS:
            if default.id in {spec.id for spec in settings.models}:
                continue
            path = build_default(default, cache)
            registry.add(ServedModel(id=default.id, kind=default.kind, path=path, created=created_time(path)))


def start_model(
    served: ServedModel,
    settings: Settings,
    *,
    model: Any = None,
    tokenizer: Any = None,
    engine_config: EngineConfig | None = None,
    encoder: Encoder | CausalLMEncoder | None = None,
) -> None:
    """Put loaded weights in service: an embedding encoder behind a micro-batcher, a chat model behind a running engine.

    A chat model gets the CPU fast paths first (unless --exact-cpu-layers); `model` is set last, so
    `served.loaded` turns true only once its engine runs.
    """
    if served.kind == "embedding":
        assert encoder is not None, "an embedding model starts from its encoder"
        served.encoder = encoder
        served.batcher = EmbeddingBatcher(encoder)
        return
    assert model is not None and tokenizer is not None and engine_config is not None, (
        "a chat model starts from its weights, tokenizer and engine configuration"
    )
    if not settings.exact_cpu_layers:
        # imported here: it loads mlx-lm (with transformers and torch, seconds) only when a chat model starts
        from server.models.cpu_layers import speed_up_for_cpu

        speed_up_for_cpu(model)
    engine = Engine(model, tokenizer, engine_config)
    engine.start()
    _learn_tokenizer(tokenizer)
    served.tokenizer, served.engine = tokenizer, engine
    served.model = model


def _learn_tokenizer(tokenizer: Any) -> None:
    # imported here: the request layer, loaded with the app anyway, need not load with this module
    from server.serving.generation import learn_tokenizer

    try:
        learn_tokenizer(tokenizer)
    except Exception:  # a tokenizer it trips on still serves: its requests work it out (and fail) as before
        log.warning("could not read the tokenizer's control tokens and think markers ahead", exc_info=True)


def engine_process_spec(served: ServedModel, settings: Settings) -> CoreSpec:
    """What a chat model's engine process is started with: the settings that apply in that process."""
    return CoreSpec(
        served.path,
        settings.dtype,
        settings.engine_config(),
        settings.exact_cpu_layers,
        settings.log_level,
        mlx_cache_gb=settings.mlx_cache_gb,  # the process that holds the KV pool needs the limit most
    )


def start_engine_process(served: ServedModel, settings: Settings) -> None:
    """A chat model's engine in a process of its own: the tokenizer loads here, the weights there."""
    engine = EngineClient(engine_process_spec(served, settings), load_chat_tokenizer(served.path))
    engine.start()
    _learn_tokenizer(engine.tokenizer)
    served.tokenizer, served.engine = engine.tokenizer, engine


def base_weights(base: ServedModel, settings: Settings) -> Any:
    """A chat model's weights in this process (a fine-tuned adapter shares them): loaded on first use when its
    own engine runs in a process of its own."""
    if base.model is None:
        model, _ = load_chat_model(base.path, settings.dtype)
        if not settings.exact_cpu_layers:
            from server.models.cpu_layers import speed_up_for_cpu

            speed_up_for_cpu(model)
        base.model = model
    return base.model


def start_split_model(served: ServedModel, settings: Settings, world: World) -> None:
    """Rank 0's start of the chat model split over the world: its shard, and an engine whose forwards every other
    rank follows. The engine runs in this process (it owns the world's group)."""
    from server.engine.step_channel import StepChannel
    from server.ranks import load_shard

    model, tokenizer, shard = load_shard(served, settings, world)
    engine = Engine(model, tokenizer, settings.engine_config(), channel=StepChannel(world.group))
    engine.start()
    _learn_tokenizer(tokenizer)
    served.tokenizer, served.engine, served.shard = tokenizer, engine, shard
    served.model = model


def load(registry: ModelRegistry, settings: Settings, world: World | None = None) -> None:
    """Load and start every model not started yet: chat models get a batch engine, embedding models a batcher; with
    a world of several ranks, the first chat model is split over them (server/ranks.py)."""
    from server.ranks import split_model

    split = split_model(registry) if world is not None and world.size > 1 else None
    for served in registry.list():
        if served.kind == "embedding" and served.batcher is None:
            start_model(served, settings, encoder=load_embedding_model(served.path, settings.dtype))
            continue
        if served is split and world is not None and served.engine is None:
            started = time.perf_counter()
            start_split_model(served, settings, world)
            log.info("loaded %s over %d ranks in %.1fs", served.id, world.size, time.perf_counter() - started)
            continue
        if served.kind == "chat" and served.engine is None:
            started = time.perf_counter()
            if settings.engine == "process":
                start_engine_process(served, settings)
            else:
                model, tokenizer = load_chat_model(served.path, settings.dtype)
                start_model(served, settings, model=model, tokenizer=tokenizer, engine_config=settings.engine_config())
            log.info("loaded %s in %.1fs", served.id, time.perf_counter() - started)
    if any(served.weights_here for served in registry.list()):
        # weights and KV pools are resident now. A process whose models all run in engine processes never
        # touches the device: on a GPU it would hold a CUDA context (and its memory) for nothing
        apply_memory_limits(settings.mlx_cache_gb)


def unload(served: ServedModel) -> None:
    """Stop a model's engine or batcher (in-flight sequences end with finish_reason "abort")."""
    if served.engine is not None:
        served.engine.shutdown()
    if served.batcher is not None:
        served.batcher.shutdown()


def shutdown(registry: ModelRegistry) -> None:
    """Stop every model's engine or batcher."""
    for served in registry.list():
        unload(served)


def build_registry(registry: ModelRegistry, settings: Settings, world: World | None = None) -> None:
    """prepare + load, recording a failure instead of raising (runs on a start-up thread)."""
    try:
        prepare(registry, settings)
        load(registry, settings, world)
    except Exception as exc:  # reported by /ready and the start-up log; the process stays up
        registry.failure = f"{type(exc).__name__}: {exc}"
        log.exception("model start-up failed")
        return
    registry.mark_ready()
