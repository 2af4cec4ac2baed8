"""`python -m server` is the `mlx-dropin` command."""

import sys

from server.cli import main

if __name__ == "__main__":  # not when a spawned process (the engine core) imports this module again
    sys.exit(main())
