#!/usr/bin/env bash
# Set up (if needed) and run the test suite; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
