"""Engine micro-benchmark: decode-step time by batch size, the cost of admitting, and the
engine against mlx-lm's own loops.

Runs the worker's own ``Engine`` in process (no sockets) on one model, once per BLAS thread
count, each in a fresh process. Parts (``--parts``):

- ``decode``: for each batch size B, fill the batch with B sequences, then time decode steps.
- ``admit``: the steps in which new prompts are admitted while 8 sequences decode, alone or
  in groups: the figures behind the default ``decode_capacity`` and ``admission_batch``.
- ``compare``: per-step cost at batch 1, 2, 4 and 8 of mlx-lm's ``generate_step`` (batch 1),
  mlx-lm's ``BatchGenerator`` and the engine (batch path; solo path at batch 1), measured
  side by side in interleaved rounds, with the engine's split into mlx-lm's time and ours
  (:mod:`benchmarks.engine_compare`).
- ``overlap``: how much host work between steps the step in flight hides.

    python -m benchmarks engine-step [--model demo-small] [--threads 1,2] [--parts ...] [--quick] [--out DIR]
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


def measure(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """In this process, the parts asked for (see the module doc)."""
    from workers.blas import describe_blas, find_blas, preload_blas

    preload_blas(find_blas("auto"))
    from benchmarks import engine_compare
    from workers.models.precision import load_model
    from workers.models.sources import resolve_source

    model, tokenizer = load_model(str(resolve_source(model_name)))
    parts = set(args.parts.split(","))
    out: dict[str, Any] = {"blas": describe_blas()}
    if "decode" in parts or "admit" in parts:
        out.update(decode_and_admit(model, tokenizer, _ints(args.batch_sizes) if "decode" in parts else [],
                                    args.steps, _ints(args.admit_groups) if "admit" in parts else []))
    if "compare" in parts:
        out["compare"] = engine_compare.compare(model, tokenizer, _ints(args.compare_sizes), args.steps, args.rounds)
    if "overlap" in parts:
        out["overlap"] = engine_compare.overlap(model, tokenizer, _ints(args.overlap_sizes),
                                                [float(x) for x in args.host_ms.split(",")], args.steps, args.rounds)
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def decode_and_admit(model: Any, tokenizer: Any, batch_sizes: list[int], steps: int, admit_groups: list[int]) -> dict[str, Any]:
    """Decode-step seconds per batch size, and admission-step costs."""
    from workers.engine.adapter import Engine, EngineRequest

    prompt = tokenizer.encode("A fixed prompt of a few words to start each sequence with.")
    out: dict[str, Any] = {"decode": {}, "admit": {}}
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
    ap.add_argument("--threads", default="1,2", help="BLAS thread counts, one fresh process each (empty: as set)")
    ap.add_argument("--parts", default="decode,admit,compare,overlap")
    ap.add_argument("--compare-sizes", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of compare and overlap")
    ap.add_argument("--overlap-sizes", default="1,8")
    ap.add_argument("--host-ms", default="0,0.5,1,2,4", help="host work between steps for overlap (ms)")
    ap.add_argument("--name", default="engine_step")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): demo, batches 1-4, 5 steps, 1 thread")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.batch_sizes, args.admit_groups, args.steps, args.threads = "demo", "1,2,4", "1,2", 5, "1"
        args.compare_sizes, args.rounds, args.overlap_sizes, args.host_ms = "1,2", 2, "1", "0,1"
        args.name += "_quick"
    if args.child:
        print(json.dumps(measure(args.model, args)))
        return
    results: dict[str, Any] = {}
    child_args = ["--model", args.model, "--batch-sizes", args.batch_sizes, "--admit-groups", args.admit_groups,
                  "--steps", str(args.steps), "--parts", args.parts, "--compare-sizes", args.compare_sizes,
                  "--rounds", str(args.rounds), "--overlap-sizes", args.overlap_sizes, "--host-ms", args.host_ms]
    for threads in args.threads.split(",") if args.threads else ["as set"]:
        progress(f"engine_step: OPENBLAS_NUM_THREADS={threads}")
        env = {**os.environ, **({} if threads == "as set" else {"OPENBLAS_NUM_THREADS": threads})}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.engine_step", "--child", *child_args], env=env,
                              capture_output=True, text=True, timeout=900,
                              cwd=REPO_ROOT)  # this checkout's modules, not an installed copy
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        results[threads] = json.loads(proc.stdout.strip().splitlines()[-1])
    blas = next(iter(results.values()))["blas"]
    report = Report(args.name, "Engine step time by batch size (in process)", environment(blas, args.model),
                    {"steps": args.steps, "batch_sizes": args.batch_sizes, "admit_groups": args.admit_groups,
                     "parts": args.parts, "compare_sizes": args.compare_sizes, "rounds": args.rounds,
                     "overlap_sizes": args.overlap_sizes, "host_ms": args.host_ms})
    report.results = results
    report.add_markdown(markdown(results))
    _, md = report.write(args.out)
    print(md.read_text())


def markdown(results: dict[str, Any]) -> str:
    """The report's tables, for the parts that ran."""
    from benchmarks.engine_compare import compare_markdown, overlap_markdown

    first = next(iter(results.values()))
    lines: list[str] = []
    if first.get("decode"):
        lines += ["| BLAS threads | batch | step (ms) | per sequence (ms) | tok/s |", "|---|---|---|---|---|"]
        for threads, r in results.items():
            for b, d in r["decode"].items():
                lines.append(f"| {threads} | {b} | {d['median_s'] * 1000:.1f} | {d['per_seq_ms']:.2f} | "
                             f"{int(b) / d['median_s']:.0f} |")
    if first.get("admit"):
        lines += ["", "Admitting G new prompts while 8 sequences decode: time until all decode together.", "",
                  "| BLAS threads | G | ms | steps |", "|---|---|---|---|"]
        for threads, r in results.items():
            for g, d in r["admit"].items():
                lines.append(f"| {threads} | {g} | {d['seconds_until_all_decoding'] * 1000:.1f} | {d['steps']} |")
    if "compare" in first:
        lines += ["", "## The engine against mlx-lm's own loops", "",
                  "Median ms per step (median over interleaved rounds), each system with its own sequences of equal "
                  "length; the engine's step includes its detokenizing and stop-string work. The engine's split: time "
                  "inside mlx-lm per step cycle, and its own time around it.", "",
                  compare_markdown({t: r["compare"] for t, r in results.items()})]
    if "overlap" in first:
        lines += ["", "## Host work hidden behind the step in flight", "",
                  "The engine steps with a fixed amount of busy host work after each step. Hidden = host work minus "
                  "what it added to the step cycle: the part that ran while MLX still computed the next step.", "",
                  overlap_markdown({t: r["overlap"] for t, r in results.items()})]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
