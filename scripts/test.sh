#!/usr/bin/env bash
# Set up (if needed) and run the test suite; arguments go to pytest.
# The set-up also fetches the built-in models' GGUFs (SmolLM2, Gemma 3 270M) once into
# .cache/downloads for the real_model tests; without network they skip
# (MLX_FLEET_REQUIRE_REAL_MODEL=1 makes them fail).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test
export MLX_FLEET_DOWNLOADS="${MLX_FLEET_DOWNLOADS:-$PWD/.cache/downloads}"
for model in smollm2 gemma3; do
    .venv/bin/mlx-fleet pull --fetch-only "$model" >/dev/null \
        || echo "test.sh: $model could not be fetched (see above); its real_model tests will skip" >&2
done
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
