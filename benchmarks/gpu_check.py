"""One GPU run that explains itself, sized to the time it is given (``benchmarks/gpu_check.sh run``).

In order, each part a fresh process with its own deadline, sized from a calibration of one
sequential request on this machine:

1. ``seed``: the seed comparison (bare, v1.4.1, default, mlx_lm.server), 1 and 8 clients, with
   the fleets' request paths and step-time split.
2. ``seq2``: the same sequential comparison with only the fleet (default) and bare alive,
   requests back to back.
3. ``seq2_alternating``: the same, requests alternating between bare and the fleet.
4. ``seq2_alternating_direct``: the same, the fleet's client in the main thread, no client thread.
5. ``overhead``: benchmarks/overhead.py (alternating, 100 tokens).
6. ``concurrency``: the fleet (default) and mlx_lm.server at 1, 8 and 32 clients.
7. ``engine_step``: the engine against generate_step and BatchGenerator at batch 1-8 in process,
   and how much host work the step in flight hides.

Rows 1-5 each switch one candidate cause of the sequential overhead on or off (other systems
alive; back-to-back requests; the client thread); the summary puts them in one table. After
every part the summary (``gpu_check.md``, ``gpu_check.json``, with each part's own report
inside) is rewritten, so a run cut off by its time limit still leaves what it measured.

    python -m benchmarks.gpu_check --model DIR --end-epoch SECONDS [--out DIR] [--max-tokens 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import results_dir
from benchmarks.gpu_summary import summary_markdown

REPO_ROOT = Path(__file__).resolve().parents[1]
MARGIN_S = 20.0  # a part's process may outlive its own deadline by this much (report, shutdown)
MIN_PART_S = 30.0  # a part is skipped when less than this is left for it


@dataclass
class Part:
    """One benchmark run of the check: its share of the time, and how its size follows from it."""

    name: str
    share: float  # of the time left when it starts, relative to the parts still to run
    startup_req: float  # start-up and warm-up, in sequential requests
    cost_req: float  # sequential requests per question (or per request) per repeat


PARTS = (
    Part("seed", 0.40, 40, 6.6),
    Part("seq2", 0.09, 12, 2.3),
    Part("seq2_alternating", 0.09, 12, 2.3),
    Part("seq2_alternating_direct", 0.09, 12, 2.3),
    Part("overhead", 0.08, 16, 4.0),
    Part("concurrency", 0.17, 40, 1.0),
    Part("engine_step", 0.08, 0, 0),
)


@dataclass
class Check:
    """Where the run stands: the calibration and every part's outcome."""

    model: str
    max_tokens: int
    end_s: float  # on time.time()
    calibration: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)


def calibrate(model: str, max_tokens: int) -> dict[str, Any]:
    """In this process: load time, and time of one sequential greedy request (``stream_generate``)."""
    from workers.blas import find_blas, preload_blas

    preload_blas(find_blas("auto"))
    import mlx.core as mx
    from mlx_lm import load

    from benchmarks.overhead import run_in_process
    from workers.models.sources import resolve_source

    t0 = time.monotonic()
    m, tok = load(str(resolve_source(model)))
    load_s = time.monotonic() - t0
    for _ in range(2):
        run_in_process(m, tok, "Warm up: say something.", max_tokens)
    times = [run_in_process(m, tok, f"({i}) What is a queue?", max_tokens) for i in range(3)]
    return {"load_s": load_s, "t_req_s": sorted(s.total_s for s in times)[1],
            "ttft_s": sorted(s.ttft_s for s in times)[1], "device": str(mx.default_device()),
            "mlx": mx.__version__}


def size(part: Part, seconds: float, t_req_s: float, caps: dict[str, int]) -> tuple[int, int]:
    """(questions or requests, repeats) that fit ``seconds`` by the cost model."""
    usable = max(0.0, seconds / t_req_s - part.startup_req)
    for repeats in (min(2, caps["repeats"]), 1):
        n = int(usable / max(part.cost_req * repeats, 1e-9))
        if n >= 16 or repeats == 1:
            return max(4, min(n, caps["questions"])), repeats
    return 4, 1


def command(part: Part, check: Check, seconds: float, out: Path, caps: dict[str, int]) -> list[str]:
    """The part's command line, sized to ``seconds``."""
    t_req = check.calibration["t_req_s"]
    n, repeats = size(part, seconds, t_req, caps)
    py, model, mt = [sys.executable, "-m", "benchmarks"], check.model, str(check.max_tokens)
    deadline = ["--deadline-s", f"{seconds:.0f}"]
    if part.name == "seed":
        return [*py, "seed", "--out", str(out), "--name", part.name, "--model", model, "--max-tokens", mt,
                "--configs", "bare,v1.4.1,fast-path,mlx_lm.server", "--questions", str(n), "--repeats", str(repeats),
                "--clients", "8", "--warmup", "1", *deadline]
    if part.name.startswith("seq2"):
        order = "alternating" if "alternating" in part.name else "back-to-back"
        client = "direct" if part.name.endswith("direct") else "thread"
        return [*py, "seed", "--out", str(out), "--name", part.name, "--model", model, "--max-tokens", mt,
                "--configs", "bare,fast-path", "--variants", "sequential", "--questions", str(n),
                "--repeats", str(repeats), "--order", order, "--client", client, "--warmup", "1", *deadline]
    if part.name == "overhead":
        return [*py, "overhead", "--out", str(out), "--name", part.name, "--model", model, "--max-tokens", "100",
                "--requests", str(min(n * repeats, caps["questions"])), "--warmup", "2", *deadline]
    if part.name == "concurrency":
        return [*py, "concurrency", "--out", str(out), "--name", part.name, "--model", model, "--max-tokens", "64",
                "--levels", "1,8,32", "--policies", "default", "--per-client", "2", "--min-requests", "8", *deadline]
    # About 20 system-rounds of (steps + 1) steps in 3 rounds, a step costing up to 1.5 sequential tokens.
    per_step_s = 1.5 * t_req / max(1, check.max_tokens)
    steps = max(4, min(30, int(seconds * 0.6 / (per_step_s * 3 * 20))))
    return [*py, "engine-step", "--out", str(out), "--name", part.name, "--model", model, "--threads", "",
            "--parts", "compare,overlap", "--steps", str(steps), "--rounds", "3"]


def run_part(part: Part, check: Check, work: Path, caps: dict[str, int], remaining_share: float) -> dict[str, Any]:
    """Run one part under its deadline; what it wrote, or why it did not."""
    left = check.end_s - time.time() - MARGIN_S
    seconds = min(left, max(left * part.share / remaining_share, MIN_PART_S))  # earlier parts come first
    if seconds < MIN_PART_S:
        return {"status": "skipped", "why": f"{max(left, 0):.0f} s left"}
    cmd = command(part, check, seconds, work, caps)
    log(f"part {part.name}: {seconds:.0f} s: {' '.join(cmd[2:])}")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=max(10.0, min(seconds + MARGIN_S, check.end_s - time.time() - 5)))
        status, tail = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stderr[-3000:]
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr or ""
        status, tail = "cut off (timeout)", (err.decode(errors="replace") if isinstance(err, bytes) else err)[-3000:]
    out: dict[str, Any] = {"status": status, "seconds": time.monotonic() - t0, "allotted_s": seconds,
                           "command": cmd[2:], "stderr_tail": tail if status != "ok" else ""}
    for suffix, key in ((".json", "report"), (".md", "markdown")):
        path = work / f"{part.name}{suffix}"
        if path.exists():  # written after every run, so present even when cut off
            out[key] = json.loads(path.read_text()) if suffix == ".json" else path.read_text()
    log(f"part {part.name}: {status} in {out['seconds']:.0f} s")
    return out


def write(check: Check, out: Path) -> None:
    """gpu_check.json (everything) and gpu_check.md (the summary, then each part's report)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(check.__dict__, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(summary_markdown(check.__dict__))


LOG: list[str] = []


def log(text: str) -> None:
    """A progress line on stderr, kept for the summary."""
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    LOG.append(line)
    print(line, file=sys.stderr, flush=True)


def gpu_info() -> str:
    """nvidia-smi's one-line view of the GPU, or why there is none."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return proc.stdout.strip() or proc.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"no nvidia-smi ({type(exc).__name__})"


def main(argv: list[str] | None = None) -> int:
    """Calibrate, then run the parts in order until the time is spent; the summary after each."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model folder or a demo name")
    ap.add_argument("--end-epoch", type=float, help="finish by this time.time() (default: now + --budget-s)")
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--max-tokens", type=int, default=50)
    ap.add_argument("--questions", type=int, default=50, help="most questions (or requests) per part")
    ap.add_argument("--repeats", type=int, default=2, help="most repeats per part")
    ap.add_argument("--parts", default=",".join(p.name for p in PARTS))
    ap.add_argument("--out", type=Path, default=results_dir())
    ap.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.calibrate:
        print(json.dumps(calibrate(args.model, args.max_tokens)))
        return 0
    check = Check(args.model, args.max_tokens, args.end_epoch or time.time() + args.budget_s)
    check.calibration = {"gpu": gpu_info()}
    caps = {"questions": args.questions, "repeats": args.repeats}
    log(f"gpu_check: {check.end_s - time.time():.0f} s; GPU: {check.calibration['gpu']}")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--calibrate", "--model", args.model,
                           "--max-tokens", str(args.max_tokens)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=max(30.0, min(240.0, check.end_s - time.time() - 30)))
    if proc.returncode != 0:
        check.calibration["error"] = proc.stderr[-3000:]
        write(check, args.out)
        log("calibration failed; see gpu_check.md")
        return 1
    check.calibration.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    log(f"calibrated: {check.calibration}")
    write(check, args.out)
    wanted = [p for p in PARTS if p.name in args.parts.split(",")]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        for i, part in enumerate(wanted):
            check.parts[part.name] = run_part(part, check, Path(work), caps, sum(p.share for p in wanted[i:]))
            check.calibration["log"] = LOG
            write(check, args.out)
    log(f"wrote {args.out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
