"""Engine micro-benchmark: decode-step time by batch size, and the cost of admitting.

Runs the worker's own ``Engine`` in process (no sockets) on one model. For each
batch size B it fills the batch with B sequences, then times decode steps. It
also times the steps in which new prompts are admitted, alone or in groups: the
figures behind the default ``decode_capacity`` and ``admission_batch``.

    python -m benchmarks engine-step [--model demo-small] [--threads 1,2] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Report, add_out_argument, environment, progress

REPO_ROOT = Path(__file__).resolve().parents[1]


def measure(model_name: str, batch_sizes: list[int], steps: int, admit_groups: list[int]) -> dict[str, Any]:
    """In this process: decode-step seconds per batch size, and admission-step costs."""
    from workers.blas import describe_blas, find_blas, preload_blas

    preload_blas(find_blas("auto"))
    from workers.engine import Engine, EngineRequest, load_model
    from workers.models import resolve_source

    model, tokenizer = load_model(str(resolve_source(model_name)))
    prompt = tokenizer.encode("A fixed prompt of a few words to start each sequence with.")
    out: dict[str, Any] = {"blas": describe_blas(), "decode": {}, "admit": {}}
    for b in batch_sizes:
        eng = Engine(model, tokenizer, decode_capacity=max(batch_sizes), admission_batch=b)
        eng.insert([EngineRequest(f"s{i}", prompt, 10_000) for i in range(b)])
        while eng.stats.last_batch_size < b:  # prefill until all decode together
            eng.step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t0)
        times.sort()
        out["decode"][b] = {"median_s": times[len(times) // 2], "per_seq_ms": times[len(times) // 2] / b * 1000}
        eng.close()
    base = 8
    for g in admit_groups:
        eng = Engine(model, tokenizer, decode_capacity=base + g, admission_batch=g)
        eng.insert([EngineRequest(f"s{i}", prompt, 10_000) for i in range(base)])
        while eng.stats.last_batch_size < base:
            eng.step()
        for _ in range(3):
            eng.step()
        eng.insert([EngineRequest(f"n{i}", prompt, 10_000) for i in range(g)])
        t0 = time.perf_counter()
        extra_steps = 0
        while eng.stats.last_batch_size < base + g:
            eng.step()
            extra_steps += 1
        out["admit"][g] = {"seconds_until_all_decoding": time.perf_counter() - t0, "steps": extra_steps}
        eng.close()
    return out


def main(argv: list[str] | None = None) -> None:
    """Run ``measure`` once per BLAS thread count, each in a fresh process."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    ap.add_argument("--admit-groups", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): demo, batches 1-4, 5 steps, 1 thread")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    name = "engine_step"
    if args.quick:
        args.model, args.batch_sizes, args.admit_groups, args.steps, args.threads = "demo", "1,2,4", "1,2", 5, "1"
        name += "_quick"
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    groups = [int(x) for x in args.admit_groups.split(",")]
    if args.child:
        print(json.dumps(measure(args.model, sizes, args.steps, groups)))
        return
    results: dict[str, Any] = {}
    for threads in args.threads.split(","):
        progress(f"engine_step: OPENBLAS_NUM_THREADS={threads}")
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.engine_step", "--child", "--model", args.model,
                               "--batch-sizes", args.batch_sizes, "--admit-groups", args.admit_groups,
                               "--steps", str(args.steps)], env=env, capture_output=True, text=True, timeout=900,
                              cwd=REPO_ROOT)  # this checkout's modules, not an installed copy
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        results[threads] = json.loads(proc.stdout.strip().splitlines()[-1])
    blas = next(iter(results.values()))["blas"]
    report = Report(name, "Engine step time by batch size (in process)", environment(blas, args.model),
                    {"steps": args.steps, "batch_sizes": sizes, "admit_groups": groups})
    report.results = results
    lines = ["| BLAS threads | batch | step (ms) | per sequence (ms) | tok/s |", "|---|---|---|---|---|"]
    for threads, r in results.items():
        for b, d in r["decode"].items():
            lines.append(f"| {threads} | {b} | {d['median_s'] * 1000:.1f} | {d['per_seq_ms']:.2f} | {int(b) / d['median_s']:.0f} |")
    lines += ["", "Admitting G new prompts while 8 sequences decode: time until all decode together.", "",
              "| BLAS threads | G | ms | steps |", "|---|---|---|---|"]
    for threads, r in results.items():
        for g, d in r["admit"].items():
            lines.append(f"| {threads} | {g} | {d['seconds_until_all_decoding'] * 1000:.1f} | {d['steps']} |")
    report.add_markdown("\n".join(lines))
    _, md = report.write(args.out)
    print(md.read_text())


if __name__ == "__main__":
    main()
