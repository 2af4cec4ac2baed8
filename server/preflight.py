"""Start-up checks `mlx-dropin serve` runs before it loads anything; each failure is one clear line.

The data directory must be a directory the server can create and write in. The listening sockets are
bound here, before the app is built and models load, so a port already in use ends the process at once
(exit status 1, no traceback) instead of after minutes of loading; hypercorn then serves the already
bound sockets (its ``fd://`` binds).
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hypercorn.config import Config


class StartupError(Exception):
    """The server cannot start; the message is the one line printed to the user."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_data_dir(path: Path) -> None:
    """Create `path` if needed and prove a file can be written in it."""
    if path.exists() and not path.is_dir():
        raise StartupError(f"the data directory {path} is a file, not a directory (--data-dir)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise StartupError(f"the data directory {path} is not usable (--data-dir): {_reason(exc)}") from exc


def bind_listeners(config: Config) -> None:
    """Bind every address of `config.bind` now and point the config at the bound sockets."""
    addresses = ", ".join(config.bind)
    try:
        sockets = config.create_sockets()
    except OSError as exc:
        hint = {
            errno.EADDRINUSE: " (another process listens there: stop it or pick another --port)",
            errno.EADDRNOTAVAIL: " (no such address on this machine: check --host)",
            errno.EACCES: " (ports below 1024 need privileges: pick another --port)",
        }.get(exc.errno or 0, "")
        raise StartupError(f"cannot listen on {addresses}: {_reason(exc)}{hint}") from exc
    # the sockets' descriptors pass to hypercorn, which owns and closes them from here on
    config.bind = [f"fd://{sock.detach()}" for sock in sockets.insecure_sockets]
