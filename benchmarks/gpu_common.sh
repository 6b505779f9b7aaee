# Shared by benchmarks/gpu_seed.sh and benchmarks/gpu_check.sh (sourced, not run): getting mlx[cuda]
# and a random-weight model of Llama-3.2-3B's configuration onto a GPU machine that has no network
# and takes 64 MiB per call. The mlx-cuda-13 wheel alone is ~90 MB, so it travels split in halves:
#     prepare   here: wheels into .gpu/a (first half) and .gpu/b (second half + the small wheels)
#     stage     first call on the machine, carry .gpu/a: the first half and the model into $WORK
#     install   second call, carry .gpu/b: join the halves, install into $WORK/site (see run)
# With mlx[cuda] already installed (a CUDA machine with PyPI access), prepare and stage are not needed.

WORK=${GPU_WORK:-${GPU_SEED_WORK:-/tmp/gpu-seed}}
MODEL_DIR=$WORK/llama-3.2-3b-config
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
    # LLAMA3B_ARGS=--tiny makes a tiny folder with the same keys (a CPU smoke test of these scripts).
    PYTHONPATH=. "$PY" -m benchmarks.llama3b "$MODEL_DIR" --dtype bfloat16 ${LLAMA3B_ARGS:-}
}

install_carried() {
    [ -d .gpu/b ] || return 0  # mlx[cuda] already installed
    mkdir -p "$WORK/parts"
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

show_device() {
    "$PY" -c 'import mlx.core as mx; print("MLX", mx.__version__, "default device", mx.default_device())'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
}

dispatch() {
    # The sourcing script defines run(); the rest is common to both.
    case "${1:-run}" in
        prepare) prepare ;;
        stage) stage ;;
        run) run ;;
        model) write_model ;;
        *) echo "usage: $0 prepare|stage|run|model" >&2; exit 2 ;;
    esac
}
