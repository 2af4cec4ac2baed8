"""One model over two ranks (`mlx.launch --backend ring` on loopback, as a user launches it): tensor-parallel
greedy outputs equal the single-process engine's, token for token, for tiny random Llama and Qwen3 models; a
rank that dies ends rank 0's engine with an "unavailable" error rather than a hang.

Two processes on this machine's two cores share them: this proves correctness, not speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.real_vocab import QWEN3_ADDED, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")


def launch(script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`mlx.launch --backend ring -n 2` of one of this directory's rank scripts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    return subprocess.run(
        [str(LAUNCH), "--backend", "ring", "-n", "2", "--python", sys.executable, str(script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    return {
        "llama": tiny_model_dir(
            root / "llama", vocab="gpt-2", template="mistralai-Mistral-Nemo-Instruct-2407", model_type="llama"
        ),
        "qwen3": tiny_model_dir(
            root / "qwen3",
            vocab="qwen2",
            template="Qwen-Qwen3-0.6B",
            model_type="qwen3",
            eos_token="<|im_end|>",
            added=QWEN3_ADDED,
        ),
    }


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tensor_parallel_greedy_equals_one_process(models: dict[str, Path], family: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = launch(ROOT / "tests" / "distributed_ranks.py", str(models[family]), str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["sharded"] == result["single"]
    assert set(result["single"]) == {"0", "1", "2", "3", "n2", "turn2", "long"}
    assert result["largest_message"] > 4096  # a message longer than the channel's first frame arrived whole
    assert [len(tokens) for tokens in result["single"]["0"]] == [12] and len(result["single"]["n2"]) == 2
    assert "tensor parallel, rank 0 of 2: 2 attention heads and 1 KV heads" in result["shard"]
    assert result["prompt_tokens_reused"] > 0  # shared prefix blocks and the conversation's turn hit the pool
    assert "rank 1: followed" in done.stdout
