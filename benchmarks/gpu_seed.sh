#!/usr/bin/env bash
# The seed's 50-question comparison on a GPU with mlx[cuda], on a random-weight model of
# Llama-3.2-3B's configuration (the seed's model; benchmarks/llama3b.py writes it).
#
# Where mlx[cuda] is installed (any CUDA machine with PyPI access):
#     pip install -e '.[bench]' 'mlx[cuda13]' && benchmarks/gpu_seed.sh run
#
# On this project's lent GPU machine (no network, Python 3.12, 64 MiB per call; the mlx-cuda-13
# wheel alone is ~90 MB, so it travels split in two calls, and the second call must follow the
# first within the machine's 30 s warm window; benchmarks/gpu_common.sh does the travelling):
#     benchmarks/gpu_seed.sh prepare          # here: wheels into .gpu/a and .gpu/b (.gitignore'd)
#     device run, carry [".gpu/a"]:  bash benchmarks/gpu_seed.sh stage     # parts + model into /tmp
#     device run, carry [".gpu/b"]:  bash benchmarks/gpu_seed.sh run       # install, run, write $OUT
#
# QUESTIONS, REPEATS, CLIENTS and MAX_TOKENS override the defaults below (50/2/8/50, sized to
# fit one 10-minute call; REPEATS=3 matches the CPU report when time allows).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/gpu_common.sh
. benchmarks/gpu_common.sh

QUESTIONS=${QUESTIONS:-50}
REPEATS=${REPEATS:-2}
CLIENTS=${CLIENTS:-8}
MAX_TOKENS=${MAX_TOKENS:-50}

run() {
    install_carried
    [ -f "$MODEL_DIR/model.safetensors" ] || write_model
    show_device
    export PYTHONUNBUFFERED=1 MLX_FLEET_BLAS=reference  # the GPU does the matmuls
    "$PY" -m benchmarks --out "${OUT:-benchmarks/results/gpu}" seed --name seed_gpu_llama3b \
        --model "$MODEL_DIR" --questions "$QUESTIONS" --repeats "$REPEATS" --clients "$CLIENTS" --max-tokens "$MAX_TOKENS"
}

dispatch "$@"
