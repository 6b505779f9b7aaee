#!/usr/bin/env bash
# The seed's 50-question comparison on a GPU with mlx[cuda], on a random-weight model of
# Llama-3.2-3B's configuration (the seed's model; benchmarks/llama3b.py writes it).
#
# Where mlx[cuda] is installed (any CUDA machine with PyPI access):
#     pip install -e '.[bench]' 'mlx[cuda13]' && benchmarks/gpu_seed.sh run
#
# On this project's lent GPU machine (no network, Python 3.12, 64 MiB per call; the mlx-cuda-13
# wheel alone is ~90 MB, so it travels split in two calls, and the second call must follow the
# first within the machine's 30 s warm window):
#     benchmarks/gpu_seed.sh prepare          # here: wheels into .gpu/a and .gpu/b (.gitignore'd)
#     device run, carry [".gpu/a"]:  bash benchmarks/gpu_seed.sh stage     # parts + model into /tmp
#     device run, carry [".gpu/b"]:  bash benchmarks/gpu_seed.sh run       # install, run, write $OUT
#
# QUESTIONS, REPEATS, CLIENTS and MAX_TOKENS override the defaults below (50/2/8/50, sized to
# fit one 10-minute call; REPEATS=3 matches the CPU report when time allows).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${GPU_SEED_WORK:-/tmp/gpu-seed}
MODEL_DIR=$WORK/llama-3.2-3b-config
QUESTIONS=${QUESTIONS:-50}
REPEATS=${REPEATS:-2}
CLIENTS=${CLIENTS:-8}
MAX_TOKENS=${MAX_TOKENS:-50}
PY=${PYTHON:-python3}
MLX_VERSION=0.32.4
MLX_LM_VERSION=0.32.2

prepare() {
    rm -rf .gpu && mkdir -p .gpu/dl .gpu/a .gpu/b
    local plat=(--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
                --platform manylinux2014_x86_64)
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
        -d .gpu/dl "mlx==$MLX_VERSION" "mlx-cuda-13==$MLX_VERSION" "mlx-lm==$MLX_LM_VERSION" pyzmq
    # The big wheel is split in halves, one per call; the small ones ride with the second.
    local big
    big=$(ls .gpu/dl/mlx_cuda_13-*.whl)
    split -n 2 -d "$big" ".gpu/a/$(basename "$big").part"
    mv ".gpu/a/$(basename "$big").part01" .gpu/b/
    mv .gpu/dl/*.whl .gpu/b/ && rm -f ".gpu/b/$(basename "$big")" && rmdir .gpu/dl
    du -sh .gpu/a .gpu/b
}

stage() {
    mkdir -p "$WORK/parts"
    cp .gpu/a/* "$WORK/parts/"
    write_model
}

write_model() {
    # LLAMA3B_ARGS=--tiny makes a tiny folder with the same keys (a CPU smoke test of this script).
    PYTHONPATH=. "$PY" -m benchmarks.llama3b "$MODEL_DIR" --dtype bfloat16 ${LLAMA3B_ARGS:-}
}

install_carried() {
    [ -d .gpu/b ] || return 0  # mlx[cuda] already installed
    cp .gpu/b/*.part* "$WORK/parts/"
    local name
    name=$(ls "$WORK"/parts/*.part00 | sed 's/\.part00$//')
    cat "$name".part* > "$name"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$name" .gpu/b/*.whl
    # libmlx.so finds CUDA's libraries at $ORIGIN/../../nvidia/*/lib: lend it the installed NVIDIA wheels.
    local nv
    nv=$("$PY" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
    if [ -n "$nv" ] && [ ! -e "$WORK/site/nvidia" ]; then ln -s "$nv" "$WORK/site/nvidia"; fi
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
}

run() {
    mkdir -p "$WORK/parts"
    install_carried
    [ -f "$MODEL_DIR/model.safetensors" ] || write_model
    "$PY" -c 'import mlx.core as mx; print("MLX", mx.__version__, "default device", mx.default_device())'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    export PYTHONUNBUFFERED=1 MLX_FLEET_BLAS=reference  # the GPU does the matmuls
    "$PY" -m benchmarks --out "${OUT:-benchmarks/results/gpu}" seed --name seed_gpu_llama3b \
        --model "$MODEL_DIR" --questions "$QUESTIONS" --repeats "$REPEATS" --clients "$CLIENTS" --max-tokens "$MAX_TOKENS"
}

case "${1:-run}" in
    prepare) prepare ;;
    stage) stage ;;
    run) run ;;
    model) write_model ;;
    *) echo "usage: $0 prepare|stage|run|model" >&2; exit 2 ;;
esac
