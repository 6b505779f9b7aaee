#!/usr/bin/env bash
# Set up (if needed), type-check, and run the test suite; arguments go to pytest.
# By default the tests marked slow are left out (-m "not slow"; CI runs this); --all as the
# first argument runs every test, and an -m of your own replaces the default one.
# mypy --strict runs first on actors/ broker/ workers/ mlx_fleet/ (pyproject.toml's [tool.mypy];
# its cache is .cache/mypy) and an error fails the run before any test starts.
# The set-up also fetches the built-in models' GGUFs (SmolLM2, Gemma 3 270M) once into
# .cache/downloads for the real_model tests; without network they skip
# (MLX_FLEET_REQUIRE_REAL_MODEL=1 makes them fail).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test
SECONDS=0
if ! mypy_out="$(.venv/bin/mypy 2>&1)"; then
    printf '%s\n' "$mypy_out" >&2
    echo "test.sh: mypy found type errors (above); no tests run" >&2
    exit 1
fi
echo "test.sh: mypy --strict: ${mypy_out##*$'\n'} (${SECONDS} s)"
export MLX_FLEET_DOWNLOADS="${MLX_FLEET_DOWNLOADS:-$PWD/.cache/downloads}"
for model in smollm2 gemma3; do
    .venv/bin/mlx-fleet pull --fetch-only "$model" >/dev/null \
        || echo "test.sh: $model could not be fetched (see above); its real_model tests will skip" >&2
done
tier=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
    shift
    tier=()
fi
# ${tier[@]+...}: bash before 4.4 (macOS) calls an empty array unbound under set -u
exec .venv/bin/python -m pytest -q -p no:cacheprovider ${tier[@]+"${tier[@]}"} "$@"
