"""`python -m server` is the `mlx-dropin` command."""

import sys

from server.cli import main

sys.exit(main())
