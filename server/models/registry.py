"""The registry of served models: public ids -> model directories and, once loaded, the weights.

Building it has two stages. ``prepare`` fetches or converts every model's
files (may download, may take minutes on first start) and registers them;
``load`` reads chat weights into memory. The server answers /health during
both, and /ready only after both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.config import ModelSpec, Settings
from server.errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from server.models.cache import ModelCache
from server.models.defaults import DEFAULTS, ModelKind, build_default
from server.models.loading import detect_kind, load_chat_model, resolve_source

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One model the server answers for; `model`/`tokenizer` are set once its weights are loaded."""

    id: str
    kind: ModelKind
    path: Path
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "mlx-dropin"
    model: Any = None
    tokenizer: Any = None
    engine: Any = None  # server.engine.engine.Engine for chat models, once loaded
    encoder: Any = None  # an Encoder or DecoderEncoder (server.embeddings) for embedding models, once loaded
    batcher: Any = None  # its micro-batcher
    owner: str | None = None  # the tenant a fine-tuned model belongs to; None = every caller sees it
    base: ServedModel | None = None  # a fine-tuned model's base (its weights are shared)
    adapter_path: Path | None = None  # a fine-tuned model's adapter directory
    listed: bool = True  # False: callable by id but left out of GET /v1/models (fine-tuning checkpoints)
    last_used: float = 0.0

    def visible_to(self, tenant: str | None) -> bool:
        return self.owner is None or tenant is None or self.owner == tenant

    @property
    def loaded(self) -> bool:
        return self.model is not None if self.kind == "chat" else self.batcher is not None


class ModelRegistry:
    """Maps public model ids to ServedModels; picks the default per kind when a request names none."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._defaults: dict[ModelKind, str] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.failure: str | None = None
        # loads a fine-tuned model's adapter on first use (set by the fine-tuning service)
        self.adapter_loader: Callable[[ServedModel], None] | None = None
        self._loading = threading.Lock()

    def add(self, served: ServedModel) -> None:
        with self._lock:
            if served.id in self._models:
                raise ValueError(f"model id {served.id!r} is registered twice")
            self._models[served.id] = served
            if served.owner is None:
                self._defaults.setdefault(served.kind, served.id)

    def remove(self, model_id: str) -> ServedModel | None:
        with self._lock:
            return self._models.pop(model_id, None)

    def list(self, tenant: str | None = None) -> list[ServedModel]:
        """Every model, or only those a tenant may see (the shared ones and its own fine-tuned ones)."""
        with self._lock:
            return [m for m in self._models.values() if m.visible_to(tenant)]

    def get(self, model_id: str, tenant: str | None = None) -> ServedModel:
        with self._lock:
            served = self._models.get(model_id)
        if served is None or not served.visible_to(tenant):
            raise ModelNotFoundError(model_id)
        return served

    def default_id(self, kind: ModelKind) -> str | None:
        return self._defaults.get(kind)

    def resolve(self, model_id: str | None, kind: ModelKind, tenant: str | None = None) -> ServedModel:
        """The model a request asked for (or the default of its kind), loaded and of the right kind."""
        if not model_id:
            default = self._defaults.get(kind)
            if default is None:
                raise ModelNotFoundError("", param="model")
            model_id = default
        served = self.get(model_id, tenant)
        if served.kind != kind:
            article = "an" if served.kind[0] in "aeiou" else "a"
            raise InvalidRequestError(f"The model '{model_id}' is {article} {served.kind} model and cannot serve "
                                      f"this endpoint.", param="model", code="model_not_supported")
        if not served.loaded and served.adapter_path is not None and self.adapter_loader is not None \
                and served.base is not None and served.base.loaded:
            with self._loading:  # one adapter load at a time; others wait for it
                if not served.loaded:
                    self.adapter_loader(served)
        if not served.loaded:
            raise ServiceUnavailableError(f"The model '{model_id}' is still loading; retry shortly.",
                                          headers={"retry-after": "5"})
        served.last_used = time.monotonic()
        return served

    async def acquire(self, model_id: str | None, kind: ModelKind, tenant: str | None = None) -> ServedModel:
        """`resolve` off the event loop when a fine-tuned model's adapter must be loaded first."""
        try:
            served = self.get(model_id, tenant) if model_id else None
        except ModelNotFoundError:
            served = None
        if served is not None and served.adapter_path is not None and not served.loaded:
            from starlette.concurrency import run_in_threadpool

            return await run_in_threadpool(self.resolve, model_id, kind, tenant)
        return self.resolve(model_id, kind, tenant)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def mark_ready(self) -> None:
        self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)


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


def load(registry: ModelRegistry, settings: Settings) -> None:
    """Load every model: chat models get a running batch engine, embedding models an encoder and batcher."""
    from server.engine.engine import Engine
    from server.models.cpu_layers import speed_up_for_cpu

    for served in registry.list():
        if served.kind == "embedding" and served.batcher is None:
            from server.embeddings.batcher import EmbeddingBatcher
            from server.embeddings.decoder import load_embedding_model

            served.encoder = load_embedding_model(served.path, settings.dtype)
            served.batcher = EmbeddingBatcher(served.encoder)
            continue
        if served.kind == "chat" and served.model is None:
            started = time.perf_counter()
            model, tokenizer = load_chat_model(served.path, settings.dtype)
            if not settings.exact_cpu_layers:
                speed_up_for_cpu(model)
            engine = Engine(model, tokenizer, settings.engine_config())
            engine.start()
            served.tokenizer, served.engine = tokenizer, engine
            served.model = model  # last: `loaded` turns true only with the engine running
            log.info("loaded %s in %.1fs", served.id, time.perf_counter() - started)


def unload(served: ServedModel) -> None:
    """Stop a model's engine or batcher (in-flight sequences end with finish_reason "abort")."""
    if served.engine is not None:
        served.engine.shutdown()
    if served.batcher is not None:
        served.batcher.shutdown()


def shutdown(registry: ModelRegistry) -> None:
    for served in registry.list():
        unload(served)


def build_registry(registry: ModelRegistry, settings: Settings) -> None:
    """prepare + load, recording a failure instead of raising (runs on a start-up thread)."""
    try:
        prepare(registry, settings)
        load(registry, settings)
    except Exception as exc:  # reported by /ready and the start-up log; the process stays up
        registry.failure = f"{type(exc).__name__}: {exc}"
        log.exception("model start-up failed")
        return
    registry.mark_ready()


__all__ = ["ModelRegistry", "ServedModel", "ModelSpec", "build_registry", "prepare", "load", "shutdown", "unload"]
