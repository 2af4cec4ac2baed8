"""server/engine/__init__.py: the engine's public names resolve, and importing the package alone loads no MLX."""

import subprocess
import sys

import pytest

import server.engine


def test_every_public_name_resolves() -> None:
    for name in server.engine.__all__:
        value = getattr(server.engine, name)
        assert getattr(value, "__name__", name) == name


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchName"):
        server.engine.NoSuchName  # noqa: B018


def test_configs_load_without_mlx() -> None:
    code = "import sys; from server.engine import EngineConfig; print('mlx.core' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "False"
