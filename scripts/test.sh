#!/usr/bin/env bash
# Set up (if needed) and run the test suite; arguments go to pytest.
# The set-up also fetches SmolLM2's GGUF once into .cache/downloads for the real_model
# tests; without network they skip (MLX_FLEET_REQUIRE_REAL_MODEL=1 makes them fail).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test
export MLX_FLEET_DOWNLOADS="${MLX_FLEET_DOWNLOADS:-$PWD/.cache/downloads}"
.venv/bin/mlx-fleet pull --fetch-only smollm2 >/dev/null \
    || echo "test.sh: SmolLM2 could not be fetched (see above); the real_model tests will skip" >&2
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
