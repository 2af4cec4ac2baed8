"""mlx-dropin: an OpenAI-compatible server for MLX.

Importing the package loads OpenBLAS (Linux) before anything imports mlx.core:
see server/models/blas.py for why the order matters.
"""

from server.models.blas import load_fast_blas

load_fast_blas()

__version__ = "0.1.0"
