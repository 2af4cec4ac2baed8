"""`mlx-dropin serve --split pipeline` over two ranks (`mlx.launch --backend ring -n 2` on loopback): a tiny random
Ministral 3 (one of mlx-lm's models with `model.pipeline`) split by layers, rank 1 running the first layer and
rank 0 the second. Greedy chat answers equal a one-process server's, and /metrics and the log say which layers
each rank runs. (Faults, shutdown and the conformance kit are exercised on the tensor-parallel split in
test_distributed_serve.py: the engine's lock step does not depend on the split.)
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_distributed_serve import (
    ROOT,
    Launch,
    chat_all,
    clean_env,
    serve_args,
    stop,
    wait_ready,
)
from tests.serving import free_port, ring_launch
from tests.test_distributed import ministral3_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ministral3_dir(tmp_path_factory.mktemp("pipeline") / "ministral3", layers=2)


def start(command: list[str], root: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = root / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=clean_env(), stdin=subprocess.PIPE, stdout=out, stderr=out
        )  # stdin: mlx.launch spins a core polling a stdin at EOF
    return process, log


@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Launch]]:
    """The one-process reference and the two-rank pipeline split, both up at once."""
    one_root, split_root = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("split")
    one_port, split_port = free_port(), free_port()
    one, one_log = start([sys.executable, *serve_args(model_dir, one_root, one_port)], one_root, one_port)
    launcher = ring_launch(2)
    split, split_log = start(
        [*launcher, *serve_args(model_dir, split_root, split_port), "--split", "pipeline"], split_root, split_port
    )
    try:
        wait_ready(f"http://127.0.0.1:{one_port}", [one], one_log)
        wait_ready(f"http://127.0.0.1:{split_port}", [split], split_log)
        yield f"http://127.0.0.1:{one_port}", Launch(f"http://127.0.0.1:{split_port}", split_log, split)
    finally:
        stop([one, split])


@pytest.mark.parametrize("stream", [False, True])
def test_pipeline_greedy_answers_equal_one_process(servers: tuple[str, Launch], stream: bool) -> None:
    single, launched = servers
    expected = chat_all(single, stream)
    assert all(expected) and len(set(expected)) == len(expected)
    assert chat_all(launched.base, stream) == expected


def test_pipeline_layers_are_reported(servers: tuple[str, Launch]) -> None:
    launched = servers[1]
    metrics = httpx.get(launched.base + "/metrics", timeout=10).text
    assert 'mlx_dropin_world_size{backend="any"} 2.0' in metrics
    assert 'mlx_dropin_model_shard_layers{layers="held",mode="pipeline",model="tiny"} 1.0' in metrics
    assert 'mlx_dropin_model_shard_layers{layers="total",mode="pipeline",model="tiny"} 2.0' in metrics
    assert 'mlx_dropin_model_shard_heads{heads="kv",mode="pipeline",model="tiny"} 2.0' in metrics
    text = launched.log.read_text()
    assert "tiny: pipeline parallel, rank 0 of 2: layers 1-1 of 2" in text
    assert "tiny: pipeline parallel, rank 1 of 2: layers 0-0 of 2" in text
