"""Throwaway PostgreSQL clusters and HAProxy processes for tests: find the binaries, start a real server on a
free 127.0.0.1 port, wait until it answers, stop it and remove its files. No mocks: these are the distribution's
own `postgres` and `haproxy`.

A missing binary skips the test that needs it (`require_service`), or fails it where
MLX_DROPIN_REQUIRE_SERVICES=1 (CI), so that CI cannot pass by skipping.

Lifetime: each server is a direct child of the test process, stopped by `stop()` (the fixtures' finalizers) and,
as a safety net, at interpreter exit (atexit). Where util-linux's `setpriv` exists (Linux), the child also carries
a parent-death signal, so it ends even when pytest is SIGKILLed: PostgreSQL gets SIGINT (its fast shutdown),
HAProxy SIGTERM. Limits: the parent-death signal fires when the *thread* that started the child ends, so start
servers from the main thread (pytest fixtures do); without `setpriv` (macOS) a SIGKILLed pytest leaves the server
running; and a SIGKILLed pytest always leaves the server's directory behind (/tmp/mlx-dropin-pg-* when root).
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

REQUIRE_SERVICES_ENV = "MLX_DROPIN_REQUIRE_SERVICES"
# What to install for each service `require_service` names.
INSTALL_HINTS = {
    "postgresql": "apt-get install -y postgresql (Debian/Ubuntu) or brew install postgresql (macOS)",
    "haproxy": "apt-get install -y haproxy (Debian/Ubuntu) or brew install haproxy (macOS)",
}
POSTGRES_USER = "postgres"  # the OS account that runs the cluster when the tests run as root (Debian's package)
POSTGRES_SUPERUSER = "postgres"  # the cluster's superuser role, passwordless (auth trust)
POSTGRES_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}
STARTUP_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 10.0
UNIX_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS; keep margin for ".s.PGSQL.NNNNN"
DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
LOG_TAIL_CHARS = 4000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_service(name: str) -> NoReturn:
    """Stop the current test because service `name` ("postgresql", "haproxy") is not installed: a skip, or a failure
    where MLX_DROPIN_REQUIRE_SERVICES=1."""
    hint = INSTALL_HINTS.get(name, f"install {name}")
    message = f"{name} is not installed; {hint}"
    if os.environ.get(REQUIRE_SERVICES_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_SERVICES_ENV}=1 requires it)", pytrace=False)
    pytest.skip(message)


def _postgres_bindir_of(executable: Path) -> Path | None:
    """The directory of a PostgreSQL install that `executable` (e.g. a symlink to initdb) belongs to."""
    bindir = executable.resolve().parent
    return bindir if (bindir / "postgres").is_file() and (bindir / "initdb").is_file() else None


def _version_key(bindir: Path) -> tuple[int, ...]:
    """/usr/lib/postgresql/15/bin -> (15,), for picking the newest; non-numeric versions sort first."""
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (-1,)


def find_postgres_bindir() -> Path | None:
    """The directory holding `postgres` and `initdb`: PATH's pg_ctl or initdb, `pg_config --bindir`, else the newest
    /usr/lib/postgresql/*/bin (Debian keeps them off PATH)."""
    for name in ("pg_ctl", "initdb"):
        found = shutil.which(name)
        if found is not None and (bindir := _postgres_bindir_of(Path(found))) is not None:
            return bindir
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and (bindir := _postgres_bindir_of(Path(out.stdout.strip()) / "initdb")) is not None:
            return bindir
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if _postgres_bindir_of(p / "initdb")]
    return max(candidates, key=_version_key) if candidates else None


def find_haproxy() -> Path | None:
    """The `haproxy` executable: PATH, else /usr/sbin (not on a non-root PATH on Debian)."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found is not None else None


def _log_tail(log: Path) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return text[-LOG_TAIL_CHARS:] or "(empty log)"


def _parent_death_prefix(signal_name: str, account: pwd.struct_passwd | None) -> list[str]:
    """A command prefix that has the kernel send `signal_name` to the started program when this thread ends, and
    (when `account` is given) runs it as that account. setpriv execs in place, so the program stays our direct
    child and the signal reaches it (runuser would fork and stand between). Without setpriv: no parent-death
    signal; runuser for `account`, else no prefix."""
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    if setpriv is None:
        if account is not None:
            return ["runuser", "-u", account.pw_name, "--"]
        return []
    prefix = [setpriv, "--pdeathsig", signal_name]
    if account is not None:
        prefix += ["--reuid", str(account.pw_uid), "--regid", str(account.pw_gid), "--init-groups"]
    return [*prefix, "--"]


def _traversable_by(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether `account` may search every directory from / down to `path` (mode bits only; ACLs ignored)."""
    groups = {account.pw_gid, *os.getgrouplist(account.pw_name, account.pw_gid)}
    for directory in [path, *path.parents]:
        info = directory.stat()
        if info.st_uid == account.pw_uid:
            needed = stat.S_IXUSR
        elif info.st_gid in groups:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not info.st_mode & needed:
            return False
    return True


def _stop_process(process: subprocess.Popen[bytes], first_signal: signal.Signals, timeout_s: float) -> None:
    """Send `first_signal`, wait up to `timeout_s`, then SIGKILL the process's whole group (its own session)."""
    if process.poll() is not None:
        return
    process.send_signal(first_signal)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=timeout_s)


@dataclass
class PostgresServer:
    """A running throwaway PostgreSQL cluster on 127.0.0.1:`port`, superuser `postgres` without password.

    `root` holds the data directory (`pgdata`), the unix socket directory (`socket`) and the server log
    (`postgres.log`). `stop()` removes pgdata and socket, or all of `root` when `start` made it (`owns_root`).
    """

    bindir: Path
    root: Path
    owns_root: bool
    port: int
    process: subprocess.Popen[bytes]
    stopped: bool = field(default=False)

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        """The URL of the default `postgres` database."""
        return self.database_url(POSTGRES_SUPERUSER)

    def database_url(self, name: str) -> str:
        return f"postgresql://{POSTGRES_SUPERUSER}@127.0.0.1:{self.port}/{name}"

    @classmethod
    def start(cls, root: Path) -> PostgresServer:
        """initdb a cluster in `root`/pgdata and start it; returns once it accepts connections.

        Running as root (PostgreSQL refuses to), the cluster belongs to the `postgres` account; when that account
        cannot reach `root` (pytest's /tmp/pytest-of-root is mode 700), or when `root` is too deep for a unix
        socket path, the cluster lives in a fresh /tmp/mlx-dropin-pg-* directory instead, removed at `stop()`.
        """
        bindir = find_postgres_bindir()
        if bindir is None:
            raise FileNotFoundError(f"PostgreSQL's initdb/postgres not found; {INSTALL_HINTS['postgresql']}")
        account = _postgres_account()
        root = root.resolve()
        root.mkdir(parents=True, exist_ok=True)
        socket_path_len = len(str(root / "socket" / ".s.PGSQL.65535"))
        owns_root = socket_path_len > UNIX_SOCKET_PATH_MAX or (
            account is not None and not _traversable_by(root, account)
        )
        if owns_root:
            root = Path(tempfile.mkdtemp(prefix="mlx-dropin-pg-"))
            root.chmod(0o755)  # mkdtemp's 0700 would keep the account out of its own pgdata
        server_dirs = (root / "pgdata", root / "socket")
        try:
            for directory in server_dirs:
                directory.mkdir()
                if account is not None:
                    os.chown(directory, account.pw_uid, account.pw_gid)
            cls._initdb(bindir, root / "pgdata", account)
            return cls._start_postmaster(bindir, root, owns_root, account)
        except BaseException:
            for directory in (root,) if owns_root else server_dirs:
                shutil.rmtree(directory, ignore_errors=True)
            raise

    @staticmethod
    def _initdb(bindir: Path, pgdata: Path, account: pwd.struct_passwd | None) -> None:
        as_account = ["runuser", "-u", account.pw_name, "--"] if account is not None else []
        command = [
            *as_account,
            str(bindir / "initdb"),
            f"--pgdata={pgdata}",
            f"--username={POSTGRES_SUPERUSER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        # cwd: a directory the account can read (initdb complains about an unreadable one)
        result = subprocess.run(command, cwd=pgdata, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({result.returncode}): {' '.join(command)}\n{result.stdout}{result.stderr}"
            )

    @classmethod
    def _start_postmaster(
        cls, bindir: Path, root: Path, owns_root: bool, account: pwd.struct_passwd | None
    ) -> PostgresServer:
        port = free_port()
        settings = [arg for key, value in POSTGRES_SETTINGS.items() for arg in ("-c", f"{key}={value}")]
        command = [
            *_parent_death_prefix("INT", account),  # SIGINT: PostgreSQL's fast shutdown
            str(bindir / "postgres"),
            "-D",
            str(root / "pgdata"),
            "-p",
            str(port),
            "-k",
            str(root / "socket"),
            *settings,
        ]
        with open(root / "postgres.log", "ab") as log:
            # Its own session: a terminal's Ctrl-C reaches pytest, which then stops the server in order.
            process = subprocess.Popen(
                command,
                cwd=root / "pgdata",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = cls(bindir=bindir, root=root, owns_root=owns_root, port=port, process=process)
        atexit.register(server.stop)
        try:
            server._wait_ready()
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {self.process.returncode} while starting; log {self.log_path}:\n"
                    f"{_log_tail(self.log_path)}"
                )
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last_error = exc
                time.sleep(0.05)
        raise TimeoutError(
            f"postgres did not accept connections on 127.0.0.1:{self.port} within {STARTUP_TIMEOUT_S:.0f} s "
            f"(last error: {last_error}); log {self.log_path}:\n{_log_tail(self.log_path)}"
        )

    def create_database(self, name: str) -> str:
        """Create an empty database `name` (lowercase letters, digits, underscores) and return its URL."""
        import psycopg
        from psycopg import sql

        if not DATABASE_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r} must match {DATABASE_NAME.pattern}")
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name`, ending any sessions still connected to it."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster, what `pg_ctl stop -m fast` sends; it is our child, so we reap
        it), SIGKILL to its process group after SHUTDOWN_TIMEOUT_S, then remove its files. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        atexit.unregister(self.stop)
        try:
            _stop_process(self.process, signal.SIGINT, SHUTDOWN_TIMEOUT_S)
        finally:
            for directory in (self.root,) if self.owns_root else (self.pgdata, self.socket_dir):
                shutil.rmtree(directory, ignore_errors=True)


def _postgres_account() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: `postgres` when we are root (it refuses root), else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root, but there is no {POSTGRES_USER!r} account to run PostgreSQL as "
            f"(PostgreSQL refuses root); {INSTALL_HINTS['postgresql']} creates it"
        ) from None


def _bind_addresses(config: str) -> list[tuple[str, int]]:
    """The host:port pairs of the config's `bind` lines (an address without a host means 127.0.0.1 here)."""
    addresses = []
    for match in re.finditer(r"^\s*bind\s+(\S*):(\d+)", config, flags=re.MULTILINE):
        host = match.group(1)
        addresses.append(("127.0.0.1" if host in ("", "*", "0.0.0.0", "::") else host, int(match.group(2))))
    return addresses


@dataclass
class HAProxy:
    """A running `haproxy -db` (foreground) with the given config; `frontends` are its bound host:port pairs."""

    config_path: Path
    log_path: Path
    frontends: list[tuple[str, int]]
    process: subprocess.Popen[bytes]
    stopped: bool = field(default=False)

    @classmethod
    def start(cls, config: str, root: Path) -> HAProxy:
        """Write `config` to `root`/haproxy.cfg, start haproxy on it, and return once every `bind` address accepts
        TCP connections."""
        haproxy = find_haproxy()
        if haproxy is None:
            raise FileNotFoundError(f"haproxy not found; {INSTALL_HINTS['haproxy']}")
        frontends = _bind_addresses(config)
        if not frontends:
            raise ValueError("the HAProxy config has no `bind host:port` line to wait for")
        root.mkdir(parents=True, exist_ok=True)
        config_path = root / "haproxy.cfg"
        config_path.write_text(config)
        log_path = root / "haproxy.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [*_parent_death_prefix("TERM", None), str(haproxy), "-f", str(config_path), "-db"],
                cwd=root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proxy = cls(config_path=config_path, log_path=log_path, frontends=frontends, process=process)
        atexit.register(proxy.stop)
        try:
            proxy._wait_ready()
        except BaseException:
            proxy.stop()
            raise
        return proxy

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = list(self.frontends)
        while pending:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"haproxy exited with {self.process.returncode} while starting; log {self.log_path}:\n"
                    f"{_log_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"haproxy did not listen on {pending} within {STARTUP_TIMEOUT_S:.0f} s; log {self.log_path}:\n"
                    f"{_log_tail(self.log_path)}"
                )
            try:
                with socket.create_connection(pending[0], timeout=1):
                    pending.pop(0)
            except OSError:
                time.sleep(0.02)

    @property
    def url(self) -> str:
        """http://host:port of the first frontend."""
        host, port = self.frontends[0]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """SIGTERM (haproxy's hard stop), SIGKILL after SHUTDOWN_TIMEOUT_S. Idempotent; leaves the config and log."""
        if self.stopped:
            return
        self.stopped = True
        atexit.unregister(self.stop)
        _stop_process(self.process, signal.SIGTERM, SHUTDOWN_TIMEOUT_S)
