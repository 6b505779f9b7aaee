"""What metrics cost: throughput at 16 concurrent clients with metrics on and off, in one run.

Two fleets stay up side by side on ipc:// endpoints, identical but for
``metrics_export``: one with the collector and every event sender, one without.
After a warm-up, rounds alternate between them (on/off, then off/on, ...) so
drift on the shared machine hits both alike. Each measurement is the closed-loop
driver of ``benchmarks.load``: ``--clients`` streaming clients send
``--per-client`` requests each; throughput is generated tokens over wall time.
Every prompt carries a unique tag, so no request hits the prompt cache.

The cost is reported from the medians and paired per round, with a rough 95%
interval. The worker's telemetry calls are also timed in-process (microseconds
per call): that bounds the cost where the machine is too noisy to resolve 1%.

    python benchmarks/metrics_cost.py [--rounds 7] [--clients 16] [--quick]

Writes ``benchmarks/results/metrics_cost.{json,md}`` (``metrics_cost_quick.*``
with ``--quick``, a smoke run whose numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import statistics
import tempfile
import threading
import time
import sys
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also runs as `python benchmarks/metrics_cost.py`

from workers.blas import describe_blas, find_blas, preload_blas  # noqa: E402

BLAS = preload_blas(find_blas("auto"))  # before anything imports mlx

import zmq  # noqa: E402

from actors.clock import MonotonicClock  # noqa: E402
from actors.config import BatchingConfig, FleetConfig  # noqa: E402
from actors.metrics import EventSender  # noqa: E402
from benchmarks.common import Report, environment, progress, questions  # noqa: E402
from benchmarks.load import fleet_requester, free_port, run_load  # noqa: E402
from benchmarks.overhead import local_config  # noqa: E402
from mlx_fleet.embedded import BackgroundFleet  # noqa: E402
from workers.engine.stats import StepStats  # noqa: E402
from workers.policies import make_policy  # noqa: E402
from workers.telemetry import WorkerTelemetry  # noqa: E402

TARGET_COST_PCT = 1.0
MODES = ("on", "off")


def fleet_config(model: str, mode: str, decode_capacity: int) -> tuple[FleetConfig, str]:
    """A one-worker fleet on fresh ipc endpoints, metrics on or off (events over ipc too)."""
    b = BatchingConfig(decode_capacity=decode_capacity)
    cfg, ipc_dir = local_config(model, b, metrics_export=mode == "on", metrics_port=free_port(),
                                log_level="WARNING")
    return dataclasses.replace(cfg, metrics_events=f"ipc://{ipc_dir}/events"), ipc_dir


def prompts(tag: str, n: int) -> list[str]:
    """``n`` prompts, each with a unique same-length tag: no prompt-cache hits, equal work per mode."""
    qs = questions()
    return [f"({tag} {i:03d}) {qs[i % len(qs)]}" for i in range(n)]


def metrics_proof(cfg: FleetConfig) -> dict[str, Any]:
    """That the metrics path was live: the collector's /health and its dropped-events total."""
    base = f"http://{cfg.metrics_host}:{cfg.metrics_port}"
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as reply:
            health = json.loads(reply.read())
        with urllib.request.urlopen(base + "/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError as exc:
        return {"error": str(exc)}
    dropped = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("mlxfleet_dropped_events_total{"))
    return {"events_received": health.get("events_received"), "events_malformed": health.get("events_malformed"),
            "dropped_events": dropped}


def micro_costs(n: int) -> dict[str, float]:
    """Microseconds per worker telemetry call, sending to a PULL socket a thread drains."""
    ipc_dir = tempfile.mkdtemp(prefix="mlxf-micro-", dir="/tmp")
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(f"ipc://{ipc_dir}/events")
    done = threading.Event()

    def drain() -> None:
        while not done.is_set():
            if pull.poll(50):
                while pull.poll(0):
                    pull.recv_multipart()

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    sender = EventSender(f"ipc://{ipc_dir}/events", "worker:micro", ctx=ctx)
    try:
        deadline = time.monotonic() + 10.0
        while not sender.send("step", {}) and time.monotonic() < deadline:
            time.sleep(0.01)  # until connected
        tel = WorkerTelemetry(sender, make_policy(BatchingConfig(), MonotonicClock()), model="m", worker="m-0",
                              flush_interval_s=1e9)
        t0 = time.perf_counter()
        for _ in range(n):
            tel.on_request(finish_reason="length", prompt_tokens=12, completion_tokens=64, queue_s=0.001,
                           ttft_s=0.05, e2e_s=0.4, itl_s=[0.004] * 63)
        request_us = (time.perf_counter() - t0) / n * 1e6
        stats = StepStats(steps=1, decode_steps=1, last_batch_size=16, last_step_s=0.004)  # one 4 ms step of 16
        t0 = time.perf_counter()
        for _ in range(n):
            tel.on_step(stats, 1.0)
        step_us = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for _ in range(n // 10):
            tel._batch_sizes = [16] * 25  # a 0.1 s flush at 4 ms steps
            tel.flush(1.0)
        flush_us = (time.perf_counter() - t0) / (n // 10) * 1e6
    finally:
        done.set()
        thread.join(5)
        sender.close()
        pull.close(0)
        ctx.term()
        shutil.rmtree(ipc_dir, ignore_errors=True)
    return {"request_event_us": request_us, "on_step_us": step_us, "flush_25_steps_us": flush_us}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per mode, and the cost paired within each round with a rough 95% interval."""
    by_mode = {m: [r["tok_per_s"] for r in runs if r["mode"] == m] for m in MODES}
    med = {m: statistics.median(v) for m, v in by_mode.items()}
    paired = []
    for rnd in sorted({r["round"] for r in runs}):
        tps = {r["mode"]: r["tok_per_s"] for r in runs if r["round"] == rnd}
        paired.append((tps["off"] - tps["on"]) / tps["off"] * 100.0)
    mean = statistics.fmean(paired)
    half = 1.96 * statistics.stdev(paired) / math.sqrt(len(paired)) if len(paired) > 1 else float("nan")
    return {"tok_per_s_median": med, "cost_pct_of_medians": (med["off"] - med["on"]) / med["off"] * 100.0,
            "paired_cost_pct": paired, "paired_cost_pct_mean": mean,
            "paired_cost_pct_ci95": [mean - half, mean + half], "target_pct": TARGET_COST_PCT}


def markdown(runs: list[dict[str, Any]], summary: dict[str, Any], proof: dict[str, Any],
             micro: dict[str, float], quick: bool) -> str:
    """The report's body."""
    med = summary["tok_per_s_median"]
    lo, hi = summary["paired_cost_pct_ci95"]
    lines = ["## Throughput" + (" (quick smoke run, not a result)" if quick else ""), "",
             "| metrics | median tok/s | per round (tok/s) |", "|---|---:|---|"]
    for mode in ("off", "on"):
        per_round = ", ".join(f"{r['tok_per_s']:.1f}" for r in runs if r["mode"] == mode)
        lines.append(f"| {mode} | {med[mode]:.1f} | {per_round} |")
    lines += [
        "",
        f"Cost from the medians: **{summary['cost_pct_of_medians']:.2f}%**; paired per round: mean "
        f"{summary['paired_cost_pct_mean']:.2f}%, 95% interval [{lo:.2f}%, {hi:.2f}%]. Target: <= "
        f"{summary['target_pct']:.0f}%. A negative cost is noise.",
        "",
        f"The 'on' fleet's collector: {json.dumps(proof, sort_keys=True)}.",
        "",
        "## Worker telemetry, in-process",
        "",
        "| call | µs |", "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in micro.items()),
        "",
        "A finished request costs one request event; each engine step one `on_step`; a step event is flushed at "
        "most every 0.1 s per worker.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the interleaved measurement and write the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds, each measuring on and off")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=6, help="requests per client per measurement")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--decode-capacity", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of one short request per client")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.per_client, args.max_tokens = 2, 1, 8

    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        fleets: dict[str, BackgroundFleet] = {}
        for mode in MODES:
            cfg, ipc_dir = fleet_config(args.model, mode, args.decode_capacity)
            fleets[mode] = stack.enter_context(BackgroundFleet(cfg, ipc_dir))
            progress(f"fleet up: metrics {mode}")
        requesters = {m: fleet_requester(f.cfg.frontend, args.model, args.max_tokens) for m, f in fleets.items()}
        for mode, make in requesters.items():  # warm-up: compile paths, first-request costs
            run_load(make, args.clients, prompts(f"w{mode:>3}", args.clients))
        n = args.clients * args.per_client
        for rnd in range(args.rounds):
            for mode in (MODES if rnd % 2 == 0 else MODES[::-1]):
                s = run_load(requesters[mode], args.clients, prompts(f"{rnd:02d}{mode:>3}", n)).summary()
                runs.append({"round": rnd, "mode": mode, **s})
                progress(f"round {rnd} metrics {mode:>3}: {s['tok_per_s']:.1f} tok/s, ok {s['ok']}/{s['requests']}")
        proof = metrics_proof(fleets["on"].cfg)
    micro = micro_costs(2000 if args.quick else 20000)

    summary = summarize(runs)
    name = "metrics_cost_quick" if args.quick else "metrics_cost"
    report = Report(name, "Cost of metrics: throughput with metrics on vs off", environment(describe_blas(), args.model),
                    {"clients": args.clients, "per_client": args.per_client, "max_tokens": args.max_tokens,
                     "rounds": args.rounds, "decode_capacity": args.decode_capacity, "quick": args.quick})
    report.results = {"summary": summary, "runs": runs, "collector": proof, "telemetry_us": micro}
    report.add_markdown(markdown(runs, summary, proof, micro, args.quick))
    report.publish()
    return report.results


if __name__ == "__main__":
    main()
