#!/usr/bin/env bash
# One GPU run that explains the serving overhead (benchmarks/gpu_check.py): the seed comparison
# with request paths and the step-time split; the sequential comparison with only the fleet and bare
# alive, back to back and alternating, with and without a client thread; the overhead benchmark; a
# concurrency sweep at 1, 8 and 32 clients; the engine against mlx-lm's own loops. It sizes every
# part to the time left and rewrites gpu_check.md and gpu_check.json after each part, so a run that
# is cut off still leaves what it measured.
#
# Where mlx[cuda] is installed (any CUDA machine with PyPI access):
#     pip install -e '.[bench]' 'mlx[cuda13]' && benchmarks/gpu_check.sh run
#
# On this project's lent GPU machine (no network, 64 MiB per call, 10 minutes per call, 30 s warm
# window between calls; see benchmarks/gpu_common.sh):
#     benchmarks/gpu_check.sh prepare                                # here: wheels into .gpu/a and .gpu/b
#     device run, carry [".gpu/a"], timeout_s 300:  bash benchmarks/gpu_check.sh stage   # half a wheel, the model
#     right after, carry [".gpu/b"], timeout_s 600: bash benchmarks/gpu_check.sh run     # install, run, write $OUT
# It writes gpu_check.md, gpu_check.json and gpu_check.log into $OUT (default benchmarks/results).
#
# BUDGET_S (default 530: the whole `run` call, install included), MAX_TOKENS (50), QUESTIONS (most
# per part, 50), REPEATS (most per part, 2) and PARTS (comma-separated, default all) override the
# defaults. MODEL=demo-small (or any model folder) skips the random-weight model: a CPU smoke test is
#     OUT=/tmp/gpu-check MODEL=demo-small BUDGET_S=240 QUESTIONS=4 bash benchmarks/gpu_check.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/gpu_common.sh
. benchmarks/gpu_common.sh

run() {
    local start budget out model
    start=$(date +%s)
    budget=${BUDGET_S:-530}
    out=${OUT:-benchmarks/results}
    mkdir -p "$out"
    install_carried
    if [ -n "${MODEL:-}" ]; then
        model=$MODEL
    else
        [ -f "$MODEL_DIR/model.safetensors" ] || write_model
        model=$MODEL_DIR
    fi
    show_device
    export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
    if "$PY" -c 'import sys, mlx.core as mx; sys.exit("gpu" not in str(mx.default_device()))'; then
        export MLX_FLEET_BLAS=${MLX_FLEET_BLAS:-reference}  # the GPU does the matmuls
    fi
    "$PY" -m benchmarks.gpu_check --model "$model" --end-epoch "$((start + budget))" --out "$out" \
        --max-tokens "${MAX_TOKENS:-50}" --questions "${QUESTIONS:-50}" --repeats "${REPEATS:-2}" \
        ${PARTS:+--parts "$PARTS"} 2> >(tee "$out/gpu_check.log" >&2)
}

dispatch "$@"
