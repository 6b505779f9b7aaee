"""``python -m fleet``: the `mlx-fleet` command line."""

import sys

from fleet.cli import main

sys.exit(main())
