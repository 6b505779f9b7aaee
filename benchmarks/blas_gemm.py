"""float32 GEMM GFLOP/s through MLX's CPU backend: reference BLAS vs the detected ones.

Each BLAS is measured in a fresh subprocess, because a BLAS must be preloaded before
``mlx.core`` is imported and cannot be swapped afterwards. Writes
``<out>/blas_gemm.json`` and ``.md`` (``blas_gemm_quick.*`` with ``--quick``).

    python -m benchmarks blas [--size-n 1024] [--reps 10] [--blas PATH_OR_NAME ...] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import add_out_argument, env_markdown, environment  # needs the sys.path line above
from workers.blas import describe_blas, find_blas, preload_blas

CHILD_TIMEOUT_S = 600


def measure_in_this_process(setting: str, size_n: int, reps: int, threads: int | None) -> dict[str, object]:
    """Preload ``setting``, then time ``reps`` float32 ``size_n``^3 matmuls (after warm-up)."""
    preload_blas(find_blas(setting), threads=threads)
    import mlx.core as mx  # only after the preload, on purpose

    mx.set_default_device(mx.cpu)
    a = mx.random.normal((size_n, size_n), dtype=mx.float32)
    b = mx.random.normal((size_n, size_n), dtype=mx.float32)
    mx.eval(a, b)
    mx.eval(mx.matmul(a, b))  # warm-up: thread pools, page faults
    times_s: list[float] = []
    for _ in range(reps):
        start_s = time.perf_counter()
        mx.eval(mx.matmul(a, b))
        times_s.append(time.perf_counter() - start_s)
    flop = 2.0 * size_n**3
    median_s = sorted(times_s)[len(times_s) // 2]
    return {
        "setting": setting,
        "blas": describe_blas(),
        "mlx_version": version("mlx"),
        "size_n": size_n,
        "reps": reps,
        "median_s": median_s,
        "gflops_median": flop / median_s / 1e9,
        "gflops_best": flop / min(times_s) / 1e9,
    }


def run_child(setting: str, size_n: int, reps: int, threads: int | None) -> dict[str, object]:
    """Run :func:`measure_in_this_process` in a fresh interpreter and return its JSON."""
    cmd = [sys.executable, __file__, "--child", setting, "--size-n", str(size_n), "--reps", str(reps)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # measure our preload only
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, check=False)
    if proc.returncode != 0:
        return {"setting": setting, "error": proc.stderr.strip()[-500:] or f"exit {proc.returncode}"}
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _settings_to_run(extra: list[str]) -> list[str]:
    """Reference, then every optimized BLAS we can find, then user extras; no duplicates."""
    logging.getLogger("workers.blas").setLevel(logging.ERROR)  # "mkl not found" is expected here
    settings = ["reference"]
    for name in ("auto", "openblas", "mkl"):
        choice = find_blas(name)
        if choice.path is not None and choice.path not in settings:
            settings.append(choice.path)
    return list(dict.fromkeys(settings + extra))


def _markdown(rows: list[dict[str, object]], meta: dict[str, object]) -> str:
    lines = [
        "# float32 GEMM through MLX (CPU)",
        "",
        env_markdown(meta["env"]),  # type: ignore[arg-type]
        (
            f"{meta['size_n']}x{meta['size_n']} @ {meta['size_n']}x{meta['size_n']}, median of {meta['reps']} reps; "
            f"CPU: {meta['cpu']}, {meta['cpu_count']} cores; OPENBLAS_CORETYPE={meta['openblas_coretype']!r}, "
            f"OPENBLAS_NUM_THREADS={meta['openblas_num_threads']!r}, mlx {meta['mlx_version']}."
        ),
        "",
        "| BLAS | library | GFLOP/s (median) | GFLOP/s (best) | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    ref = next((r for r in rows if r.get("setting") == "reference" and "gflops_median" in r), None)
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['setting']} | failed: {str(row['error']).splitlines()[-1]} | | | |")
            continue
        info = row["blas"]
        assert isinstance(info, dict)
        speedup = float(row["gflops_median"]) / float(ref["gflops_median"]) if ref else float("nan")  # type: ignore[arg-type]
        lines.append(f"| {info['name']} | `{info['path'] or 'bundled netlib'}` | {row['gflops_median']:.1f} "
                     f"| {row['gflops_best']:.1f} | {speedup:.1f}x |")
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; as ``--child`` measure one BLAS, else measure all and write results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-n", type=int, default=1024, help="matrix side (default 1024)")
    parser.add_argument("--reps", type=int, default=10, help="timed matmuls per BLAS (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads unless the env sets them")
    parser.add_argument("--blas", action="append", default=[], help="extra setting or .so path to measure")
    parser.add_argument("--child", metavar="SETTING", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run (not a result): 256^3, 3 reps")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    name = "blas_gemm"
    if args.quick:
        args.size_n, args.reps, name = 256, 3, "blas_gemm_quick"
    if args.child is not None:
        print(json.dumps(measure_in_this_process(args.child, args.size_n, args.reps, args.threads)))
        return 0

    rows = [run_child(s, args.size_n, args.reps, args.threads) for s in _settings_to_run(args.blas)]
    meta: dict[str, object] = {
        "size_n": args.size_n, "reps": args.reps, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "mkl_threading_layer": os.environ.get("MKL_THREADING_LAYER"), "python": platform.python_version(),
        "mlx_version": version("mlx"),
        "env": environment({"name": "one per row", "path": "each row preloads its own"}, "none (GEMM only)"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    table = _markdown(rows, meta)
    (out / f"{name}.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
