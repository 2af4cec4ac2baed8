"""The `mlx-dropin` command: models list / pull / convert, --version, start-up failures, the start-up table and
the listen backlog a burst of clients needs."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import server
from server.cli import build_parser, main
from server.models.cache import ModelCache


def test_models_pull_a_default_reuses_the_cache(model_cache: ModelCache, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--cache-dir", str(model_cache.root), "pull", "all-minilm-l6-v2"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == model_cache.entry("all-minilm-l6-v2") and (path / "config.json").is_file()


def test_models_list_shows_entries_and_their_state(model_cache: ModelCache, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--cache-dir", str(model_cache.root), "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "default" in out and " ok" in out


def test_models_convert_to_a_directory(smollm2_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "converted"
    assert main(["models", "convert", str(smollm2_gguf), "--out", str(out)]) == 0
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }


def test_bad_sources_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--cache-dir", str(tmp_path), "convert", str(tmp_path / "missing.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--port", "0"]) == 2


# -- what a new user hits first: version, help, flag order, start-up failures, the start-up table ----------

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """This environment without MLX_DROPIN_* settings, so only the flags a test passes apply."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLX_DROPIN_")} | {"PYTHONUNBUFFERED": "1"}


def _mlx_dropin(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _serve(port: int, model_dir: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`mlx-dropin serve` of one model (id `m`), expected to exit at start-up."""
    return _mlx_dropin(
        "serve", "--port", str(port), "--no-default-models", "--model", f"m={model_dir}", "--data-dir", str(data_dir)
    )


def test_version_prints_the_package_version() -> None:
    done = _mlx_dropin("--version", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"mlx-dropin {server.__version__}"


def test_pull_help_describes_its_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["models", "pull", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "Hugging Face repo id" in out and ".gguf" in out and "smollm2-135m-instruct" in out
    assert "--cache-dir" in out


def test_cache_dir_is_accepted_after_the_action(
    smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    for argv in (
        ["models", "pull", "some/repo", "--cache-dir", "/x"],
        ["models", "--cache-dir", "/x", "pull", "some/repo"],
    ):
        args = parser.parse_args(argv)
        assert (args.action, args.id, args.cache_dir) == ("pull", "some/repo", "/x")
    assert parser.parse_args(["models", "list"]).cache_dir is None
    assert main(["models", "pull", str(smollm2_dir), "--cache-dir", str(tmp_path)]) == 0
    assert Path(capsys.readouterr().out.strip()) == smollm2_dir
    assert main(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    assert f"cache: {tmp_path}" in capsys.readouterr().out


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mlx-dropin: error: ")
    return lines[0]


def test_a_port_in_use_is_one_line_and_exit_1(smollm2_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = _serve(port, smollm2_dir, tmp_path / "data")
    line = _one_line_error(done)
    assert f"127.0.0.1:{port}" in line and "in use" in line
    assert time.monotonic() - started < 60  # fails before loading any model


def test_an_unusable_data_dir_is_one_line_and_exit_1(smollm2_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # tests run as root, so a chmod'ed directory would not stop them
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = _serve(port, smollm2_dir, blocker / "data")
    line = _one_line_error(done)
    assert str(blocker / "data") in line and "--data-dir" in line


def test_a_data_dir_whose_database_is_not_sqlite_is_an_error_line(smollm2_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "mlx-dropin.sqlite3").write_text("not a database")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = _serve(port, smollm2_dir, data)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "mlx-dropin: error: cannot start: file is not a database"


def test_start_up_says_running_on_once_and_lists_the_models(smollm2_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model_id = "a-rather-long-model-id-that-is-longer-than-the-old-column"
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "serve",
                "--port",
                str(port),
                "--no-default-models",
                "--model",
                f"{model_id}={smollm2_dir}",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            cwd=ROOT,
            env=_env(),
            stdout=stdout,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 240
            while "ready at" not in out.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-2000:]
                time.sleep(0.2)
            assert _connections_queued_while_stopped(proc, port, 300) >= min(300, _somaxconn())
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    assert err.read_text().count("Running on") == 1, err.read_text()
    table = out.read_text().split("models:\n", 1)[1].splitlines()
    assert table == [f"  {model_id}  chat  {smollm2_dir}"]


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except OSError:  # not Linux: the kernel's own cap
        return 128


def _connections_queued_while_stopped(proc: subprocess.Popen[str], port: int, count: int) -> int:
    """How many of `count` connections opened at once complete their handshake while the server accepts
    none (its process stopped): the listen backlog. hypercorn's default of 100 left the rest of a burst
    of clients waiting a second for their kernels to retry (server/cli.py LISTEN_BACKLOG)."""
    proc.send_signal(signal.SIGSTOP)
    clients = []
    try:
        for _ in range(count):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            clients.append(client)
        pending, deadline = set(clients), time.monotonic() + 2
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], 0.1)
            pending -= {c for c in writable if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0}
        return count - len(pending)
    finally:
        proc.send_signal(signal.SIGCONT)
        for client in clients:
            client.close()


def test_the_model_table_aligns_long_ids_and_shows_adapters(tmp_path: Path) -> None:
    from server.cli import format_model_table
    from server.registry import ServedModel

    base = ServedModel(id="smollm2-135m-instruct", kind="chat", path=tmp_path / "base")
    rows = [
        base,
        ServedModel(id="all-minilm-l6-v2", kind="embedding", path=tmp_path / "minilm"),
        ServedModel(
            id="ft:smollm2-135m-instruct:org-with-a-long-name:custom-suffix:abc123",
            kind="chat",
            path=base.path,
            base=base,
            adapter_path=tmp_path / "adapters" / "abc123",
        ),
    ]
    lines = format_model_table(rows).splitlines()
    starts = {line.index(str(tmp_path)) for line in lines}
    assert len(starts) == 1  # every source starts in the same column
    kinds = {line.index(served.kind) for line, served in zip(lines, rows)}
    assert len(kinds) == 1
    assert lines[2].endswith(f"{tmp_path / 'adapters' / 'abc123'} (adapter on smollm2-135m-instruct)")


def test_a_base_models_created_is_its_directory_time(tmp_path: Path) -> None:
    from server.config import ModelSpec, Settings
    from server.model_lifecycle import prepare
    from server.registry import ModelRegistry

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    os.utime(model, (1_600_000_000, 1_600_000_000))
    settings = Settings(
        models=(ModelSpec("m", str(model)),),
        default_models=False,
        cache_dir=tmp_path / "cache",
        data_dir=tmp_path / "data",
    )
    created = []
    for _ in range(2):  # two server starts
        registry = ModelRegistry()
        prepare(registry, settings)
        created.append(registry.get("m").created)
    assert created == [1_600_000_000, 1_600_000_000]
