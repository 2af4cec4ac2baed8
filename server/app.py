"""Build the Starlette app: routes, middleware, error handlers, and the lifespan that loads models.

State lives on ``app.state`` (the settings, the model registry, the SQLite
database under --data-dir, the API keys, rate limits and metrics), never in
module globals. Models load on a start-up thread so /health answers at once
and /ready turns 200 when every model is in memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from server.aliases import VersionPrefixMiddleware
from server.config import Settings
from server.engine.world import World
from server.errors import APIError, handle_api_error, handle_http_exception, handle_unexpected
from server.finetune.service import FineTuning
from server.keys import KeyRing, key_id_secret
from server.metrics import Metrics
from server.middleware import (
    AccessLogMiddleware,
    AuthMiddleware,
    BodyLimitMiddleware,
    ConversationIdMiddleware,
    RateLimitMiddleware,
    RequestIdMiddleware,
    TrailingSlashMiddleware,
    UnreadBodyMiddleware,
)
from server.model_lifecycle import build_registry, shutdown
from server.persistence.database import open_database
from server.persistence.files import FileStore
from server.persistence.responses import ResponseStore
from server.rate_limits import RateLimits
from server.registry import ModelRegistry
from server.routes import embeddings, files, fine_tuning, generation, health, metrics, models, openapi, responses

log = logging.getLogger(__name__)

EXPOSED_HEADERS = ["x-request-id", "x-conversation-id", "retry-after", "retry-after-ms"] + [
    f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset") for kind in ("requests", "tokens")
]


def create_app(settings: Settings, registry: ModelRegistry | None = None, world: World | None = None) -> Starlette:
    """The ASGI app. Pass a registry to share already-loaded models (tests); else models load at start. With a
    `world` of several ranks (rank 0 under mlx.launch), the first chat model is split over them."""
    owns_registry = registry is None
    registry = registry if registry is not None else ModelRegistry()

    def start_models() -> None:
        if owns_registry:
            build_registry(registry, settings, world)
        if registry.ready:
            app.state.fine_tuning.register_models()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = threading.Thread(target=start_models, name="model-loader", daemon=True)
        loader.start()
        app.state.loader = loader
        app.state.fine_tuning.start()
        try:
            yield
        finally:
            app.state.fine_tuning.shutdown()
            if owns_registry:
                shutdown(registry)
            app.state.database.close()

    keys = KeyRing.from_settings(settings.api_keys, settings.api_keys_file, key_id_secret(settings.data_dir))
    limits = RateLimits(
        settings.rate_limit_rpm, settings.rate_limit_tpm, settings.max_concurrent_per_key, settings.rate_limit_window
    )
    observed = Metrics()
    routes = [
        *health.routes,
        *metrics.routes,
        *models.routes,
        *generation.routes,
        *responses.routes,
        *embeddings.routes,
        *files.routes,
        *fine_tuning.routes,
        *openapi.routes,
    ]
    cors = (
        [
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=EXPOSED_HEADERS,
            )
        ]
        if settings.cors_origins
        else []
    )
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(TrailingSlashMiddleware),
            Middleware(VersionPrefixMiddleware, routes=routes),  # `/chat/completions` is `/v1/chat/completions`
            Middleware(UnreadBodyMiddleware),
            Middleware(RequestIdMiddleware),
            Middleware(ConversationIdMiddleware),  # X-Conversation-Id checked and echoed
            Middleware(AccessLogMiddleware, metrics=observed, routes=routes),
            *cors,  # outside auth: browsers send preflights without the key
            Middleware(AuthMiddleware, keys=keys, metrics_key=settings.metrics_key),
            Middleware(RateLimitMiddleware, limits=limits),
            Middleware(
                BodyLimitMiddleware, max_bytes=settings.max_body_bytes, uploads={"/v1/files": settings.max_file_bytes}
            ),
        ],
        exception_handlers={
            APIError: handle_api_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # TrailingSlashMiddleware serves them in place
    app.state.settings = settings
    app.state.world = world
    app.state.registry = registry
    app.state.keys = keys
    app.state.limits = limits
    app.state.metrics = observed
    app.state.database = open_database(settings.database_url, settings.data_dir)
    log.info("database: %s", app.state.database.describe())
    app.state.files = FileStore(app.state.database, settings.data_dir / "files")
    app.state.response_store = ResponseStore(app.state.database)
    app.state.fine_tuning = FineTuning(settings, app.state.database, app.state.files, registry)
    observed.watch(app.state)
    return app
