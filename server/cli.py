"""The `mlx-dropin` command: `serve`, and `models list | pull ID | convert GGUF`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path

from server.config import Settings, add_serve_arguments, resolve_cache_dir, settings_from_args
from server.models.blas import describe_blas
from server.models.cache import MANIFEST_NAME, ModelCache, verify_manifest
from server.models.defaults import DEFAULTS, build_default
from server.models.loading import ModelSourceError, resolve_source
from server.shutdown import GracefulShutdown

log = logging.getLogger("mlx_dropin")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("mlx_dropin.access")  # bare JSON lines, one per request, on stderr
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False


def _announce_when_ready(app_state: object, settings: Settings, stop: asyncio.Event,
                         loop: asyncio.AbstractEventLoop, failed: list[str]) -> None:
    registry = app_state.registry  # type: ignore[attr-defined]
    while not registry.wait_ready(0.5):
        if registry.failure:
            failed.append(registry.failure)
            log.error("could not start: %s", registry.failure)
            loop.call_soon_threadsafe(stop.set)
            return
    base = f"http://{settings.host}:{settings.port}/v1"
    lines = [f"  {m.id:<28} {m.kind:<10} {m.path}" for m in registry.list()]
    print(f"mlx-dropin ready at {base}\nmodels:\n" + "\n".join(lines), flush=True)


def serve(settings: Settings) -> int:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    from server.app import create_app

    _setup_logging(settings.log_level)
    log.info("BLAS: %s", describe_blas())
    app = create_app(settings)
    if app.state.keys.enabled:
        log.info("API keys required (%d configured)", len(app.state.keys))
    else:
        log.warning("no API keys configured: the server is OPEN to anyone who can reach %s:%d",
                    settings.host, settings.port)
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = None
    config.loglevel = settings.log_level.upper()
    config.keep_alive_timeout = 75
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
        watcher = threading.Thread(target=_announce_when_ready, args=(app.state, settings, stop, loop, failed),
                                   daemon=True)
        watcher.start()
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        return failed

    failed = asyncio.run(main())
    return 1 if failed else 0


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
            rows.append(f"{repo.name[len('models--'):].replace('--', '/'):<40} {'hub':<10} ok")
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
        from server.models.gguf import convert_gguf

        target = Path(out)
        target.mkdir(parents=True, exist_ok=False)
        convert_gguf(Path(gguf), target)
        print(target)
        return 0
    print(resolve_source(gguf, cache))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-dropin", description="OpenAI-compatible server for MLX")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="start the server"))
    models = sub.add_parser("models", help="manage the model cache")
    models.add_argument("--cache-dir", help="model cache (default ~/.cache/mlx-dropin)")
    msub = models.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="list cached models")
    pull = msub.add_parser("pull", help="fetch a default model id or a hub repo into the cache")
    pull.add_argument("id")
    convert = msub.add_parser("convert", help="convert a GGUF file to an MLX directory")
    convert.add_argument("gguf")
    convert.add_argument("--out", help="write here instead of into the cache")
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
