"""The seed's engine integration tests against rank 0 of two ranks (run by tests/test_distributed.py through
`mlx.launch`; not collected by pytest).

    mlx.launch --backend ring -n 2 --python PY tests/distributed_pytest.py MODEL_DIR KEYWORDS TEST_PATH...

Every rank loads MODEL_DIR and takes its tensor-parallel shard. Rank 0 runs pytest on TEST_PATHs (`-k KEYWORDS`;
mlx.launch would take options meant for pytest as its own), the
`split_engine` fixture set (tests/split_engine.py): the test modules that use it serve their shared engine
from the shard while every other rank follows it, and compare with mlx-lm on an unsharded copy. The other
ranks follow engine after engine until rank 0's pytest ends. Exits with pytest's code on rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import server  # noqa: E402,F401  (OpenBLAS before mlx.core)
from server.engine.follower import follow  # noqa: E402
from server.engine.mirrored_runner import close_world  # noqa: E402
from server.engine.step_channel import StepChannel  # noqa: E402
from server.engine.world import join, shard_model  # noqa: E402
from server.models.loading import load_chat_model  # noqa: E402


def main() -> int:
    import pytest

    from tests.split_engine import SPLIT_ENGINE, SplitEngine

    model_dir, keywords = Path(sys.argv[1]), sys.argv[2]
    pytest_args = ["-q", "-p", "no:cacheprovider", "-k", keywords, *sys.argv[3:]]
    world = join("ring")
    sharded, tokenizer = load_chat_model(model_dir, "float32")
    shard = shard_model(sharded, world, "tensor")
    if world.rank != 0:
        engines = 0
        while (follower := follow(sharded, world)) is not None:
            engines += 1
            print(f"rank {world.rank}: engine {engines} made {follower.calls} calls", flush=True)
        print(f"rank {world.rank}: followed {engines} engines", flush=True)
        return 0
    split = SplitEngine(load_chat_model(model_dir, "float32"), sharded, world)
    print(f"rank 0: {shard.describe()}", flush=True)

    class Plugin:
        def pytest_configure(self, config: pytest.Config) -> None:
            config.stash[SPLIT_ENGINE] = split

    try:
        code = pytest.main(pytest_args, plugins=[Plugin()])
    finally:
        close_world(StepChannel(world.group))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
