"""One entry point for every benchmark: ``python -m benchmarks [--out DIR] [--quick] COMMAND [ARGS...]``.

Each command is a module with its own ``main(argv)``; ARGS go to it unchanged (``python
-m benchmarks seed --help`` lists them). ``--out DIR`` (default benchmarks/results) reaches
every module through ``$MLX_FLEET_BENCH_OUT``, so one that predates the option writes
there too. ``--quick`` asks each module for its smoke preset: a check that the code runs
end to end, never a result.

``all`` runs the report set one module after another, each in a fresh interpreter (a
BLAS is chosen once per process, and one failure does not stop the rest), and writes
``all.md`` with what ran, how long it took and where its report is. Modules that are
not in this checkout (written on another branch) are listed as missing and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import OUT_ENV, RESULTS_DIR, env_markdown, environment, progress
from workers.blas import find_blas, setting_from_env

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Command:
    """A subcommand: the module that implements it and what it measures."""

    name: str
    module: str
    summary: str
    report: str  # the file stem it writes (``<report>_quick`` with --quick)
    in_all: bool = True  # False: needs arguments that ``all`` cannot supply


COMMANDS: tuple[Command, ...] = (
    Command("seed", "benchmarks.seed", "the seed's 50-question table: bare engine, fleet steps, mlx_lm.server; 1 and 8 clients", "seed"),
    Command("overhead", "benchmarks.overhead", "per-request serving overhead against in-process mlx-lm, sequential", "overhead"),
    Command("concurrency", "benchmarks.concurrency", "1-32 clients: batching policies against mlx_lm.server", "concurrency"),
    Command("replicas", "benchmarks.replicas", "1 against 2 replicas of one model", "replicas"),
    Command("shards", "benchmarks.shards", "one replica sharded over 2 ranks against unsharded, 1 and 8 clients", "shards"),
    Command("engine-step", "benchmarks.engine_step", "decode-step time by batch size, cost of admitting prompts", "engine_step"),
    Command("decode-attention", "benchmarks.decode_attention", "a decode step's forward pass on the CPU: MLX's attention "
            "against grouped by KV head", "decode_attention"),
    Command("constrained", "benchmarks.constrained", "grammar-constrained against plain decoding; one controlled row's cost to the batch", "constrained"),
    Command("prefill-step", "benchmarks.prefill_step", "prefill_step_size 128/256/512: throughput and TTFT with long prompts in the mix", "prefill_step"),
    Command("prompt-cache", "benchmarks.prompt_cache", "multi-turn chat with and without the prompt cache, and mlx_lm.server", "prompt_cache"),
    Command("gateway-overhead", "benchmarks.gateway_overhead", "the HTTP gateway against the ZeroMQ client", "gateway_overhead"),
    Command("tools", "benchmarks.tools", "a tool-calling conversation on SmolLM2: grammar-forced calls against free text, 1 and 8 clients", "tools"),
    Command("metrics-cost", "benchmarks.metrics_cost", "throughput with metrics export on and off", "metrics_cost"),
    Command("blas", "benchmarks.blas_gemm", "float32 GEMM GFLOP/s: reference BLAS against the optimized ones", "blas_gemm"),
    Command("smollm2", "benchmarks.smollm2", "SmolLM2-135M float32 at 1-32 clients vs mlx_lm.server, and served vs in-process", "smollm2"),
    Command("gguf", "benchmarks.gguf", "GGUF conversion time and peak memory, tok/s per precision, built-in models' answers", "gguf"),
    Command("soak", "benchmarks.soak", "64 clients for 5 min with cancels and timeouts: crashes, lost requests, RSS", "soak"),
    Command("multiturn", "benchmarks.multiturn", "multi-turn chat on 2 and 4 replicas: least-loaded against "
            "cache-aware routing", "multiturn"),
    Command("ab", "benchmarks.ab", "two running fleets side by side (--a ADDR --b ADDR): sequential and concurrent", "ab",
            in_all=False),
)
BY_NAME = {c.name: c for c in COMMANDS}


def available(cmd: Command) -> bool:
    """Whether this checkout has the command's module (found without importing it).

    The origin must lie in this checkout: an editable install of another checkout could
    otherwise lend a module this one does not have.
    """
    spec = importlib.util.find_spec(cmd.module)
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().is_relative_to(REPO_ROOT)


def run_one(cmd: Command, argv: list[str]) -> int:
    """Import the module and call its ``main(argv)``; an int result is the exit status."""
    module = importlib.import_module(cmd.module)
    sys.argv[0] = f"python -m benchmarks {cmd.name}"  # argparse's prog in usage lines
    result = module.main(argv)
    return result if isinstance(result, int) else 0


def run_all(out: Path, quick: bool, only: list[str] | None) -> int:
    """Every available command in turn, each in its own interpreter; writes ``all.md``/``all.json``."""
    names = only or [c.name for c in COMMANDS if c.in_all]
    rows: list[dict[str, object]] = []
    t_all = time.monotonic()
    for i, name in enumerate(names, 1):
        cmd = BY_NAME[name]
        if not available(cmd):
            progress(f"all: [{i}/{len(names)}] {name}: module {cmd.module} not in this checkout; skipped")
            rows.append({"command": name, "status": "missing", "seconds": 0.0})
            continue
        progress(f"all: [{i}/{len(names)}] {name}: {cmd.summary} (elapsed {time.monotonic() - t_all:.0f} s)")
        argv = [sys.executable, "-m", "benchmarks", name, *(["--quick"] if quick else [])]
        t0 = time.monotonic()
        rc = subprocess.run(argv, cwd=REPO_ROOT, env={**os.environ, OUT_ENV: str(out)}).returncode
        seconds = time.monotonic() - t0
        status = "ok" if rc == 0 else f"failed (exit {rc})"
        progress(f"all: [{i}/{len(names)}] {name}: {status} in {seconds:.0f} s")
        rows.append({"command": name, "status": status, "seconds": seconds})
    total = time.monotonic() - t_all
    write_index(out, rows, total, quick)
    progress(f"all: done in {total:.0f} s; index in {out / ('all_quick.md' if quick else 'all.md')}")
    return 0 if all(r["status"] in ("ok", "missing") for r in rows) else 1


def write_index(out: Path, rows: list[dict[str, object]], total_s: float, quick: bool) -> None:
    """``all.md``: one line per command with its status, duration and what it measures."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "all_quick" if quick else "all"
    env = environment(dataclasses.asdict(find_blas(setting_from_env() or "auto")), model="per report")
    (out / f"{stem}.json").write_text(json.dumps({"env": env, "quick": quick, "total_s": total_s, "runs": rows}, indent=1) + "\n")
    lines = [f"# Benchmark run{' (quick smoke run: not results)' if quick else ''}", "", env_markdown(env),
             f"Total: {total_s / 60:.1f} min. Each report (`<name>.md`, `.json`, `.png`) sits in this folder.", "",
             "| command | status | minutes | report | measures |", "|---|---|---:|---|---|"]
    for r in rows:
        cmd = BY_NAME[str(r["command"])]
        md = f"{cmd.report}_quick.md" if quick else f"{cmd.report}.md"
        link = f"[{md}]({md})" if (out / md).is_file() else "—"
        lines.append(f"| `{cmd.name}` | {r['status']} | {float(r['seconds']) / 60:.1f} | {link} | {cmd.summary} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def usage() -> str:
    """The command table, with availability."""
    width = max(len(c.name) for c in COMMANDS)
    rows = [f"  {c.name:<{width}}  {c.summary}{'' if available(c) else '  [not in this checkout]'}" for c in COMMANDS]
    return ("commands:\n" + "\n".join(rows) + f"\n  {'all':<{width}}  the commands above but ab, in turn (--only a,b to pick)"
            + f"\n  {'list':<{width}}  this table")


def main(argv: list[str] | None = None) -> int:
    """Parse the global options and dispatch."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, epilog=usage(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help=f"report folder for every command (default {RESULTS_DIR})")
    ap.add_argument("--quick", action="store_true", help="each command's smoke preset (not results)")
    ap.add_argument("--only", default="", help="with `all`: comma-separated commands to run")
    ap.add_argument("command", choices=[*BY_NAME, "all", "list"], metavar="COMMAND")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="passed to the command")
    args = ap.parse_args(argv)
    if args.out is not None:
        os.environ[OUT_ENV] = str(args.out.expanduser().resolve())
    out = Path(os.environ.get(OUT_ENV) or RESULTS_DIR)
    if args.command == "list":
        print(usage())
        return 0
    if args.command == "all":
        only = [n for n in args.only.split(",") if n] or None
        bad = [n for n in only or [] if n not in BY_NAME]
        if bad:
            ap.error(f"unknown commands for --only: {bad}")
        return run_all(out, args.quick, only)
    cmd = BY_NAME[args.command]
    if not available(cmd):
        print(f"{cmd.name}: module {cmd.module} is not in this checkout", file=sys.stderr)
        return 2
    return run_one(cmd, (["--quick"] if args.quick else []) + args.args)


if __name__ == "__main__":
    sys.exit(main())
