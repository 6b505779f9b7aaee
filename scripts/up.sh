#!/usr/bin/env bash
# Set up (if needed) and run the fleet in the foreground; arguments go to `mlx-fleet up`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/mlx-fleet up "$@"
