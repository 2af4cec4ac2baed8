"""The `mlx-dropin` command: `serve`, and `models list | pull ID | convert GGUF`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from server import __version__
from server.config import Settings, resolve_cache_dir, settings_from_args
from server.engine.world import World, join, launched, watch_launcher
from server.gc_heap import freeze_start_up_heap
from server.models.blas import describe_blas
from server.models.cache import MANIFEST_NAME, ModelCache, verify_manifest
from server.models.defaults import DEFAULTS, build_default
from server.models.loading import ModelSourceError, resolve_source
from server.persistence.database import DatabaseUnavailable
from server.preflight import StartupError, bind_listeners, check_data_dir
from server.registry import ServedModel
from server.serve_flags import add_serve_arguments
from server.shutdown import GracefulShutdown

if TYPE_CHECKING:
    from hypercorn.config import Config
    from starlette.datastructures import State

log = logging.getLogger("mlx_dropin")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("mlx_dropin.access")  # bare JSON lines, one per request, on stderr
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False


def format_model_table(models: Sequence[ServedModel]) -> str:
    """The start-up table: id, kind and where each model comes from, columns as wide as their longest
    entry; a fine-tuned model shows its own adapter directory and its base."""
    rows = [
        (
            m.id,
            m.kind,
            str(m.path)
            if m.adapter_path is None
            else f"{m.adapter_path} (adapter on {m.base.id if m.base is not None else m.path})",
        )
        for m in models
    ]
    id_width = max((len(row[0]) for row in rows), default=0)
    kind_width = max((len(row[1]) for row in rows), default=0)
    return "\n".join(f"  {i:<{id_width}}  {k:<{kind_width}}  {s}" for i, k, s in rows)


def _announce_when_ready(
    app_state: State, settings: Settings, stop: asyncio.Event, loop: asyncio.AbstractEventLoop, failed: list[str]
) -> None:
    registry = app_state.registry
    while not registry.wait_ready(0.5):
        if registry.failure:
            failed.append(registry.failure)
            log.error("could not start: %s", registry.failure)
            loop.call_soon_threadsafe(stop.set)
            return
    loader = getattr(app_state, "loader", None)
    if loader is not None:  # it registers the fine-tuned models after the base models are ready
        loader.join(timeout=60)
    freeze_start_up_heap("server")
    base = f"http://{settings.host}:{settings.port}/v1"
    listed = [m for m in registry.list() if m.listed]  # fine-tuning checkpoints are not listed
    print(f"mlx-dropin ready at {base}\nmodels:\n" + format_model_table(listed), flush=True)


LISTEN_BACKLOG = 4096


def _hypercorn_config(settings: Settings) -> Config:
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = None
    # hypercorn's own logger, not a second handler of its own: its lines ("Running on ...") print once
    config.errorlog = logging.getLogger("hypercorn.error")
    config.loglevel = settings.log_level.upper()
    config.keep_alive_timeout = 75
    # connections the kernel queues until the event loop accepts them. hypercorn's 100 overflowed when 256
    # streaming clients connected at once: the dropped SYNs were retried by the clients' kernels a second
    # later, which was the ~1 s first-token wave of the H100 benchmark's last ~70 requests (bench/README.md).
    # Linux caps it at net.core.somaxconn (4096 by default since 5.4).
    config.backlog = LISTEN_BACKLOG
    return config


def _launcher_gone(world: World) -> None:
    """This rank's launcher is gone: rank 0 shuts down as on SIGTERM (it stops the other ranks); a follower ends."""
    log.warning("%s: the launcher that started this rank is gone; stopping", world.describe())
    if world.rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        logging.shutdown()
        os._exit(1)


def serve(settings: Settings) -> int:
    # imported here: the app loads MLX, which `models` and `--version` do without
    from hypercorn.asyncio import serve as hypercorn_serve

    from server.app import create_app
    from server.exit_order import exit_code, stop_model_threads

    world = None
    if launched():  # one rank of several (mlx.launch): followers serve no HTTP, they follow rank 0's forwards
        _setup_logging(settings.log_level)
        try:
            world = join(settings.distributed_backend)
        except (RuntimeError, ValueError) as exc:
            print(f"mlx-dropin: error: cannot join the ranks ({settings.distributed_backend}): {exc}", file=sys.stderr)
            return 1
        log.info("distributed: %s", world.describe())
        watch_launcher(lambda: _launcher_gone(world))
        if world.rank != 0:
            from server.ranks import serve_as_follower

            return serve_as_follower(world, settings)
    config = _hypercorn_config(settings)
    try:  # before any log line: a port in use or a bad data directory is one line and exit status 1
        check_data_dir(settings.data_dir)
        bind_listeners(config)
    except StartupError as exc:
        print(f"mlx-dropin: error: {exc}", file=sys.stderr)
        return 1
    if world is None:  # a launched rank set logging up already
        _setup_logging(settings.log_level)
    log.info("BLAS: %s", describe_blas())
    try:
        app = create_app(settings, world=world if world is not None and world.size > 1 else None)
    except (OSError, sqlite3.Error, DatabaseUnavailable) as exc:  # e.g. a database that is not SQLite, or down
        print(f"mlx-dropin: error: cannot start: {exc}", file=sys.stderr)
        return 1
    if app.state.keys.enabled:
        log.info("API keys required (%d configured)", len(app.state.keys))
    else:
        log.warning(
            "no API keys configured: the server is OPEN to anyone who can reach %s:%d", settings.host, settings.port
        )
    graceful = GracefulShutdown(app.state.registry, settings.shutdown_timeout)
    config.graceful_timeout = graceful.connection_grace
    print(f"mlx-dropin listening on http://{settings.host}:{settings.port} (loading models...)", flush=True)

    async def main() -> list[str]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            graceful.signal(loop)
            stop.set()  # hypercorn stops accepting and waits up to graceful_timeout for open connections

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        failed: list[str] = []
        watcher = threading.Thread(
            target=_announce_when_ready, args=(app.state, settings, stop, loop, failed), daemon=True
        )
        watcher.start()
        # a Starlette app is an ASGI app, but starlette types a scope as a MutableMapping and hypercorn as
        # TypedDicts, which mypy does not treat as MutableMappings
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        return failed

    failed = asyncio.run(main())
    # no thread may be inside MLX when the interpreter finalizes (exit_order.py says why)
    running = stop_model_threads(app.state.registry, getattr(app.state, "loader", None))
    return exit_code(1 if failed else 0, running)


def models_list(cache: ModelCache) -> int:
    default_ids = {d.id for d in DEFAULTS}
    rows = []
    if cache.models.is_dir():
        for entry in sorted(p for p in cache.models.iterdir() if p.is_dir() and ".tmp-" not in p.name):
            problem = verify_manifest(entry) if (entry / MANIFEST_NAME).exists() else "incomplete"
            state = "ok" if problem is None else f"damaged: {problem}"
            tag = "default" if entry.name in default_ids else "converted"
            rows.append(f"{entry.name:<40} {tag:<10} {state}")
    hub = cache.root / "hub"
    if hub.is_dir():
        for repo in sorted(hub.glob("models--*")):
            rows.append(f"{repo.name[len('models--') :].replace('--', '/'):<40} {'hub':<10} ok")
    print(f"cache: {cache.root}")
    print("\n".join(rows) if rows else "(empty)")
    return 0


def models_pull(cache: ModelCache, model_id: str) -> int:
    for default in DEFAULTS:
        if default.id == model_id:
            print(build_default(default, cache))
            return 0
    print(resolve_source(model_id, cache))
    return 0


def models_convert(cache: ModelCache, gguf: str, out: str | None) -> int:
    if out:
        # imported here: it loads MLX, which the other commands do without
        from server.models.gguf import convert_gguf

        target = Path(out)
        target.mkdir(parents=True, exist_ok=False)
        convert_gguf(Path(gguf), target)
        print(target)
        return 0
    print(resolve_source(gguf, cache))
    return 0


CACHE_DIR_HELP = "model cache (default: MLX_DROPIN_CACHE_DIR, else ~/.cache/mlx-dropin)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-dropin", description="OpenAI-compatible server for MLX")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="start the server"))
    models = sub.add_parser("models", help="manage the model cache")
    models.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    msub = models.add_subparsers(dest="action", required=True)
    listing = msub.add_parser("list", help="list cached models")
    pull = msub.add_parser("pull", help="fetch a default model id or a hub repo into the cache")
    pull.add_argument(
        "id",
        metavar="ID",
        help=f"a default model ({', '.join(d.id for d in DEFAULTS)}), a Hugging Face repo id "
        "(org/name), a local MLX directory or a .gguf file",
    )
    convert = msub.add_parser("convert", help="convert a GGUF file to an MLX directory")
    convert.add_argument("gguf", metavar="GGUF", help="the .gguf file to convert")
    convert.add_argument("--out", help="write here instead of into the cache")
    for action in (listing, pull, convert):  # also after the action: `models pull ID --cache-dir X`
        action.add_argument("--cache-dir", default=argparse.SUPPRESS, help=CACHE_DIR_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(settings_from_args(args))
        _setup_logging("info")
        cache = ModelCache(resolve_cache_dir(args.cache_dir))
        if args.action == "list":
            return models_list(cache)
        if args.action == "pull":
            return models_pull(cache, args.id)
        return models_convert(cache, args.gguf, args.out)
    except (ValueError, ModelSourceError) as exc:
        print(f"mlx-dropin: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
