#!/usr/bin/env bash
# Set up (if needed: venv, the bench extra, OpenBLAS) and run the benchmarks.
# Usage: scripts/bench.sh [--quick] [--out DIR] [--only a,b] [COMMAND [ARGS...]]
#   with no COMMAND: `all`, the whole report into benchmarks/results (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --bench

args=("$@")
has_command=0
skip_next=0
for arg in "$@"; do
    if [ "$skip_next" = 1 ]; then skip_next=0; continue; fi
    case "$arg" in
        --out|--only) skip_next=1 ;;
        -*) ;;
        *) has_command=1; break ;;
    esac
done
[ "$has_command" = 1 ] || args+=(all)
exec .venv/bin/python -m benchmarks "${args[@]}"
