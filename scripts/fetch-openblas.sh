#!/usr/bin/env bash
# Fetch Debian's OpenBLAS (pthread build) into .cache/blas/ without installing it.
#
# Why: the mlx[cpu] wheel bundles the netlib reference BLAS (~4 GFLOP/s float32 GEMM).
# Preloading OpenBLAS before mlx is imported makes CPU matmuls ~20x faster.
# workers/blas.py finds the copy this script extracts (find_blas("auto")).
#
# Usage:   scripts/fetch-openblas.sh [DEST_DIR]
#   DEST_DIR defaults to $MLX_FLEET_BLAS_DIR, else <repo root>/.cache/blas
#   (the same places workers/blas.py searches first).
#
# Idempotent: a second run only prints the path. Never fails the caller: if apt is
# missing or the download fails, it says so and exits 0 so the reference BLAS is used.
set -u

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${1:-${MLX_FLEET_BLAS_DIR:-${repo_root}/.cache/blas}}"

if [[ "$(uname -s)" != "Linux" ]]; then
    echo "fetch-openblas: not Linux ($(uname -s)); nothing to fetch (the platform BLAS is used)." >&2
    exit 0
fi

case "$(uname -m)" in
    x86_64) triplet="x86_64-linux-gnu" ;;
    aarch64 | arm64) triplet="aarch64-linux-gnu" ;;
    *)
        echo "fetch-openblas: unsupported machine $(uname -m); using the reference BLAS." >&2
        exit 0
        ;;
esac

lib_rel="usr/lib/${triplet}/openblas-pthread/libopenblas.so.0"
gfortran_rel="usr/lib/${triplet}/libgfortran.so.5"
quadmath_rel="usr/lib/${triplet}/libquadmath.so.0"

# Already fetched: just report the path.
if [[ -f "${dest_dir}/${lib_rel}" ]]; then
    echo "$(cd "${dest_dir}" && pwd)/${lib_rel}"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
    echo "fetch-openblas: apt-get/dpkg not available; using the reference BLAS." >&2
    exit 0
fi

# OpenBLAS's runtime deps: only fetch the ones the system lacks.
packages=("libopenblas0-pthread")
if [[ ! -e "/usr/lib/${triplet}/libgfortran.so.5" && ! -e "/lib/${triplet}/libgfortran.so.5" ]]; then
    packages+=("libgfortran5")
fi
if [[ ! -e "/usr/lib/${triplet}/libquadmath.so.0" && ! -e "/lib/${triplet}/libquadmath.so.0" \
      && "${triplet}" == "x86_64-linux-gnu" ]]; then
    # libquadmath exists only on x86; libgfortran5 needs it there.
    packages+=("libquadmath0")
fi

work_dir="$(mktemp -d)"
trap 'rm -rf "${work_dir}"' EXIT
# apt's sandbox user (_apt) must be able to write here, or apt warns about it.
chmod 755 "${work_dir}"
[[ "$(id -u)" == 0 ]] && id _apt >/dev/null 2>&1 && chown _apt "${work_dir}"

download() {
    (cd "${work_dir}" && apt-get download -q "${packages[@]}") >&2
}

if ! download; then
    # Stale or empty package lists are the usual cause; refresh once and retry.
    echo "fetch-openblas: download failed; running apt-get update and retrying." >&2
    if ! { apt-get update -q >&2 && download; }; then
        echo "fetch-openblas: could not download ${packages[*]} (no network or no root?);" \
             "the reference BLAS will be used." >&2
        exit 0
    fi
fi

mkdir -p "${dest_dir}"
for deb in "${work_dir}"/*.deb; do
    if ! dpkg -x "${deb}" "${dest_dir}"; then
        echo "fetch-openblas: dpkg -x failed for ${deb}; the reference BLAS will be used." >&2
        exit 0
    fi
done

if [[ ! -f "${dest_dir}/${lib_rel}" ]]; then
    echo "fetch-openblas: ${lib_rel} not found after extraction; the reference BLAS will be used." >&2
    exit 0
fi

for dep in "${gfortran_rel}" "${quadmath_rel}"; do
    [[ -f "${dest_dir}/${dep}" ]] && echo "fetch-openblas: extracted dependency ${dep}" >&2
done
echo "$(cd "${dest_dir}" && pwd)/${lib_rel}"
