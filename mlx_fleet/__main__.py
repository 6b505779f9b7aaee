"""``python -m mlx_fleet``: the `mlx-fleet` command line."""

import sys

from mlx_fleet.cli import main

sys.exit(main())
