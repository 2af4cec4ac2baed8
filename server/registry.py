"""The registry of served models: public ids -> `ServedModel`s (directory, kind, and once started, the weights).

It answers which model a request means (the named one, or the default of its
kind), checks that the caller's tenant may see it and that it is loaded, and
loads a fine-tuned model's adapter on first use through the hook the
fine-tuning service sets. Filling it and starting the models is
`server.model_lifecycle`'s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from server.errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from server.models.kind import ModelKind

if TYPE_CHECKING:  # types only: importing them loads MLX, which the command line does without
    from server.embeddings.batcher import EmbeddingBatcher
    from server.embeddings.causal_lm import CausalLMEncoder
    from server.embeddings.encoder import Encoder
    from server.engine import Engine, EngineClient
    from server.engine.world import Shard


@dataclass
class ServedModel:
    """One model the server answers for; `tokenizer` and `engine` are set once it started (`model`, the weights, only
    where they live in this process)."""

    id: str
    kind: ModelKind
    path: Path
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "mlx-dropin"
    model: Any = None
    tokenizer: Any = None
    engine: Engine | EngineClient | None = None  # a chat model's batch engine (here or in its process), once started
    encoder: Encoder | CausalLMEncoder | None = None  # an embedding model's encoder, once loaded
    batcher: EmbeddingBatcher | None = None  # the micro-batcher in front of that encoder
    owner: str | None = None  # the tenant a fine-tuned model belongs to; None = every caller sees it
    base: ServedModel | None = None  # a fine-tuned model's base (its weights are shared)
    adapter_path: Path | None = None  # a fine-tuned model's adapter directory
    listed: bool = True  # False: callable by id but left out of GET /v1/models (fine-tuning checkpoints)
    shard: Shard | None = None  # what this rank holds of a chat model split over the ranks of a world
    last_used: float = 0.0

    def visible_to(self, tenant: str | None) -> bool:
        return self.owner is None or tenant is None or self.owner == tenant

    @property
    def weights_here(self) -> bool:
        """Its weights are MLX arrays in this process (an in-process engine, base weights an adapter shares, an
        encoder); a chat model whose engine runs in a process of its own has none here."""
        return self.model is not None or self.encoder is not None

    @property
    def loaded(self) -> bool:
        return self.engine is not None if self.kind == "chat" else self.batcher is not None

    # Requests reach a model only once `registry.resolve` found it loaded; these name that state in types.
    @property
    def running_engine(self) -> Engine | EngineClient:
        """A loaded chat model's batch engine."""
        if self.engine is None:
            raise RuntimeError(f"model {self.id!r} has no running engine")
        return self.engine

    @property
    def loaded_encoder(self) -> Encoder | CausalLMEncoder:
        """A loaded embedding model's encoder."""
        if self.encoder is None:
            raise RuntimeError(f"model {self.id!r} has no loaded encoder")
        return self.encoder

    @property
    def running_batcher(self) -> EmbeddingBatcher:
        """A loaded embedding model's micro-batcher."""
        if self.batcher is None:
            raise RuntimeError(f"model {self.id!r} has no running batcher")
        return self.batcher


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
            raise InvalidRequestError(
                f"The model '{model_id}' is {article} {served.kind} model and cannot serve this endpoint.",
                param="model",
                code="model_not_supported",
            )
        if (
            not served.loaded
            and served.adapter_path is not None
            and self.adapter_loader is not None
            and served.base is not None
            and served.base.loaded
        ):
            with self._loading:  # one adapter load at a time; others wait for it
                if not served.loaded:
                    self.adapter_loader(served)
        if not served.loaded:
            raise ServiceUnavailableError(
                f"The model '{model_id}' is still loading; retry shortly.", headers={"retry-after": "5"}
            )
        served.last_used = time.monotonic()
        return served

    async def acquire(self, model_id: str | None, kind: ModelKind, tenant: str | None = None) -> ServedModel:
        """`resolve` off the event loop when a fine-tuned model's adapter must be loaded first."""
        try:
            served = self.get(model_id, tenant) if model_id else None
        except ModelNotFoundError:
            served = None
        if served is not None and served.adapter_path is not None and not served.loaded:
            return await run_in_threadpool(self.resolve, model_id, kind, tenant)
        return self.resolve(model_id, kind, tenant)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def mark_ready(self) -> None:
        self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)
