"""One model over two ranks (`mlx.launch --backend ring` on loopback, as a user launches it): tensor-parallel
greedy outputs equal the single-process engine's, token for token, for tiny random Llama and Qwen3 models, and
pipeline-parallel ones for a tiny random Ministral 3 (mlx-lm's models with `model.pipeline`); a rank that dies
ends rank 0's engine with an "unavailable" error rather than a hang.

Two processes on this machine's two cores share them: this proves correctness, not speed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.real_vocab import QWEN3_ADDED, tiny_model_dir
from tests.serving import ring_launch

ROOT = Path(__file__).resolve().parents[1]
MINISTRAL3 = {  # Ministral 3's config keys beyond tiny_model_dir's (untied: tied, a tiny one repeats its input)
    "head_dim": 16,
    "tie_word_embeddings": False,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 1e6,
        "llama_4_scaling_beta": 0.1,
        "original_max_position_embeddings": 4096,
    },
}


def ministral3_dir(out: Path, layers: int) -> Path:
    """A tiny random Ministral 3 (a model mlx-lm splits by pipeline) over GPT-2's vocabulary."""
    return tiny_model_dir(
        out,
        vocab="gpt-2",
        template="mistralai-Mistral-Nemo-Instruct-2407",
        model_type="ministral3",
        config_extra={**MINISTRAL3, "num_hidden_layers": layers},
    )


def launch(script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`mlx.launch --backend ring -n 2` of one of this directory's rank scripts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    return subprocess.run(
        [*ring_launch(2), str(script), *args],
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
        "ministral3": ministral3_dir(root / "ministral3", layers=3),  # uneven: rank 0 runs two, rank 1 one
    }


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tensor_parallel_greedy_equals_one_process(models: dict[str, Path], family: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = launch(ROOT / "tests" / "distributed_ranks.py", str(models[family]), str(out))
    assert done.returncode == 0 and out.exists(), done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["sharded"] == result["single"]
    assert set(result["single"]) == {"0", "1", "2", "3", "n2", "turn2", "long"}
    assert result["largest_message"] > 4096  # a message longer than the channel's first frame arrived whole
    assert [len(tokens) for tokens in result["single"]["0"]] == [12] and len(result["single"]["n2"]) == 2
    assert "tensor parallel, rank 0 of 2: 2 attention heads and 1 KV heads" in result["shard"]
    assert result["prompt_tokens_reused"] > 0  # shared prefix blocks and the conversation's turn hit the pool
    assert "rank 1: followed" in done.stdout


def test_pipeline_parallel_greedy_equals_one_process(models: dict[str, Path], tmp_path: Path) -> None:
    """Rank 1 runs the first layer and sends its hidden state to rank 0, which runs the other two; every KV block
    holds each rank's own layers, and the follower holds exactly rank 0's number of blocks (its layers alone
    would fit twice as many in the same memory)."""
    out = tmp_path / "result.json"
    done = launch(ROOT / "tests" / "distributed_ranks.py", str(models["ministral3"]), str(out), "pipeline")
    # (mlx.launch may exit 0 when rank 0 failed: the result file is what says it finished)
    assert done.returncode == 0 and out.exists(), done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["sharded"] == result["single"]
    assert set(result["single"]) == {"0", "1", "2", "3", "n2", "turn2", "long"}
    assert len(set(result["single"]["0"][0])) > 3  # a sequence of varied tokens: wrong KV would show
    assert "pipeline parallel, rank 0 of 2: layers 1-2 of 3" in result["shard"]
    assert result["prompt_tokens_reused"] > 0
    assert "rank 1: followed" in done.stdout
    assert f"calls over {result['blocks']} blocks" in done.stdout


class FakeGroup:
    """What mlx-lm's `model.pipeline` reads of a group: this rank and the size."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_split_choice_and_its_refusals() -> None:
    """auto takes tensor parallelism where heads divide, else pipeline; a split the model cannot take is refused
    with the reason (no collective runs: the group is a stand-in, and tensor splits are not made here)."""
    import importlib

    from server.engine.world import World, shard_model

    def ministral(heads: int, kv_heads: int, layers: int = 3) -> Any:
        module = importlib.import_module("mlx_lm.models.ministral3")
        config = {
            "model_type": "ministral3",
            "hidden_size": 48,
            "num_hidden_layers": layers,
            "intermediate_size": 96,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "rms_norm_eps": 1e-6,
            "vocab_size": 100,
            **MINISTRAL3,
        }
        return module.Model(module.ModelArgs.from_dict(config))

    world = World(rank=0, size=2, backend="ring", group=FakeGroup(0, 2))
    shard = shard_model(ministral(heads=3, kv_heads=3), world)  # 3 heads do not split over 2: pipeline
    assert shard.mode == "pipeline" and shard.layers == (1, 3) and shard.num_layers == 3
    assert shard.describe() == (
        "pipeline parallel, rank 0 of 2: layers 1-2 of 3 (3 attention heads and 3 KV heads each)"
    )
    follower = shard_model(ministral(heads=3, kv_heads=3), World(1, 2, "ring", FakeGroup(1, 2)), "pipeline")
    assert follower.layers == (0, 1)
    with pytest.raises(ValueError, match="attention heads 3, KV heads 3 not divisible by 2 ranks"):
        shard_model(ministral(heads=3, kv_heads=3), world, "tensor")
    with pytest.raises(ValueError, match="2 layers cannot go to 3 ranks"):
        shard_model(ministral(heads=3, kv_heads=3, layers=2), World(0, 3, "ring", FakeGroup(0, 3)), "pipeline")
    from mlx_lm.models import llama

    args = llama.ModelArgs.from_dict(
        {
            "model_type": "llama",
            "hidden_size": 48,
            "num_hidden_layers": 2,
            "intermediate_size": 96,
            "num_attention_heads": 3,
            "num_key_value_heads": 3,
            "rms_norm_eps": 1e-6,
            "vocab_size": 100,
        }
    )
    with pytest.raises(ValueError, match="not divisible.*no pipeline split"):
        shard_model(llama.Model(args), world)  # neither split fits: both reasons
    with pytest.raises(ValueError, match="unknown split"):
        shard_model(llama.Model(args), world, "diagonal")


# the seed's engine tests that need SmolLM2's own answers: "Paris" for the capital of France, and prompts whose
# token counts fill its 6-block pool (that one also builds an engine of its own, in one process)
NEEDS_SMOLLM2 = "not test_stop_string_is_not_emitted and not test_pool_exhaustion_fails_cleanly"


def test_seed_engine_tests_pass_against_rank_0(models: dict[str, Path]) -> None:
    """tests/integration/test_batch_engine.py with its shared engine on rank 0 of two ranks, over the tiny Llama's
    shard (SmolLM2's 9 heads do not split in two): its comparisons with mlx-lm run on the whole model."""
    done = launch(
        ROOT / "tests" / "distributed_pytest.py",
        str(models["llama"]),
        NEEDS_SMOLLM2,
        "tests/integration/test_batch_engine.py",
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "tensor parallel, rank 0 of 2" in output
    assert re.search(r"\b22 passed, 2 deselected", output) and " failed" not in output, output[-3000:]
    assert "rank 1: followed 1 engines" in output
