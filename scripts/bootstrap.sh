#!/usr/bin/env bash
# Set up a fresh clone: a virtual environment with mlx-fleet installed (editable),
# plus an optimized BLAS for MLX's CPU backend on Linux. Idempotent and quick when
# nothing changed. Usage: scripts/bootstrap.sh [--test] [--bench]
# (--test adds the test deps, --bench the benchmark plots' matplotlib)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
extras=""
for arg in "$@"; do
    case "$arg" in
        --test) extras="${extras:+$extras,}test" ;;
        --bench) extras="${extras:+$extras,}bench" ;;
    esac
done
[ -n "$extras" ] && extras="[$extras]"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "mlx-fleet needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

stamp=".venv/.mlx-fleet-installed$extras"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # uv (from PyPI, into .venv) installs the same packages as pip, compiled to bytecode as pip does
    # (imports at every process start are 1.7x slower without it), in a fraction of the time;
    # where it cannot be installed or fails, pip does the install.
    if ! { .venv/bin/python -m pip install --quiet --disable-pip-version-check uv \
           && .venv/bin/python -m uv pip install --quiet --compile-bytecode --python .venv/bin/python \
                  -e ".$extras"; }; then
        echo "bootstrap: uv could not install; installing with pip" >&2
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -e ".$extras"
    fi
    echo "$want" > "$stamp"
fi

# Linux CPU: the mlx[cpu] wheel's reference BLAS is ~20x slower than OpenBLAS.
# The fetch needs no root and exits 0 (reference BLAS fallback) when apt is absent.
if [ "$(uname -s)" = "Linux" ]; then
    bash scripts/fetch-openblas.sh >/dev/null || true
fi
