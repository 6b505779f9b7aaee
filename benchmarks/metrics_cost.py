"""What metrics cost: throughput at 16 concurrent clients with metrics on and off, in one run.

Two fleets run side by side on ipc:// endpoints, identical but for
``metrics_export``: one with the collector and every sender, one without any.
Both are warmed up, then measured in interleaved rounds (on/off, then off/on,
...) so drift on the machine hits both alike. Each measurement runs
``--clients`` concurrent clients, each sending ``--requests-per-client``
greedy requests of ``--max-tokens``; throughput is generated tokens over wall
time. It also times the worker's telemetry calls in-process (microseconds
per call), which bounds the cost where the machine is too noisy to resolve 1%.
Writes ``benchmarks/results/metrics_cost.{json,md}`` (``--quick`` writes
``metrics_cost_quick.*`` instead, a smoke run whose numbers mean little).

    python benchmarks/metrics_cost.py [--repeats 7] [--clients 16] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from actors.config import BatchingConfig, FleetConfig, ModelSpec  # needs the sys.path line above
from actors.supervisor import Supervisor
from broker.client import AsyncClient

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
TARGET_COST_PCT = 1.0


@dataclasses.dataclass
class Fleet:
    """One running fleet and where to reach it."""

    mode: str  # "on" | "off"
    cfg: FleetConfig
    sup: Supervisor
    ipc_dir: str


def start_fleet(mode: str, source: str, metrics_port: int) -> Fleet:
    """Start a one-worker fleet on fresh ipc paths, with metrics on or off."""
    ipc_dir = tempfile.mkdtemp(prefix="mlxf-bench-", dir="/tmp")
    b = BatchingConfig()
    cfg = FleetConfig(frontend=f"ipc://{ipc_dir}/front", backend=f"ipc://{ipc_dir}/back",
                      metrics_export=mode == "on", metrics_port=metrics_port,
                      metrics_events=f"ipc://{ipc_dir}/events", ready_timeout_s=300.0, drain_timeout_s=10.0,
                      log_level="WARNING", models=(ModelSpec("bench", source, 1, b),), batching=b)
    sup = Supervisor(cfg)
    try:
        sup.start()
    except BaseException:
        sup.shutdown()
        shutil.rmtree(ipc_dir, ignore_errors=True)
        raise
    return Fleet(mode, cfg, sup, ipc_dir)


def stop_fleet(fleet: Fleet) -> None:
    """Drain and stop every process of a fleet."""
    fleet.sup.shutdown()
    shutil.rmtree(fleet.ipc_dir, ignore_errors=True)


async def _load(addr: str, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    async with AsyncClient(addr, timeout_s=600) as client:
        async def one_client(c: int) -> list[tuple[int, float]]:
            out = []
            for i in range(per_client):
                t0 = time.perf_counter()
                done = await client.generate(f"Client {c}, request {i}: tell me about batching.", model="bench",
                                             max_tokens=max_tokens)
                out.append((done.usage["completion_tokens"], time.perf_counter() - t0))
            return out

        t0 = time.perf_counter()
        per = await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall_s = time.perf_counter() - t0
    results = [r for rs in per for r in rs]
    tokens = sum(n for n, _ in results)
    return {"requests": len(results), "tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / wall_s,
            "latency_p50_s": statistics.median(t for _, t in results)}


def measure(fleet: Fleet, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    """One measurement: ``clients`` concurrent clients, ``per_client`` requests each."""
    return asyncio.run(_load(fleet.cfg.frontend, clients, per_client, max_tokens))


def metrics_health(fleet: Fleet) -> dict[str, Any]:
    """Proof the metrics path was live: the collector's /health and the dropped-events total."""
    base = f"http://127.0.0.1:{fleet.cfg.metrics_port}"
    out: dict[str, Any] = {}
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as reply:
            out["health"] = json.loads(reply.read())
        with urllib.request.urlopen(base + "/metrics", timeout=5) as reply:
            text = reply.read().decode()
        out["dropped_events"] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                    if line.startswith("mlxfleet_dropped_events_total{"))
    except OSError as exc:
        out["error"] = str(exc)
    return out


def micro_costs(n: int) -> dict[str, float]:
    """Microseconds per worker telemetry call, sending to a PULL socket drained by a thread."""
    import threading

    import zmq

    from actors.clock import MonotonicClock
    from actors.metrics import EventSender
    from workers.policies import make_policy
    from workers.telemetry import WorkerTelemetry

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
            time.sleep(0.01)  # wait for the connection
        tel = WorkerTelemetry(sender, make_policy(BatchingConfig(), MonotonicClock()), model="m", worker="m-0",
                              flush_interval_s=1e9)
        t0 = time.perf_counter()
        for _ in range(n):
            tel.on_request(finish_reason="length", prompt_tokens=12, completion_tokens=64, queue_s=0.001,
                           ttft_s=0.05, e2e_s=0.4, itl_s=[0.004] * 63)
        request_us = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for _ in range(n):
            tel.on_step(16, 0.004, 1.0)
        step_us = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for _ in range(n // 10):
            tel._batch_sizes = [16] * 25
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
    """Medians per mode, and the paired cost (off vs on within each round) with a rough 95% interval."""
    by_mode = {m: [r["tokens_per_s"] for r in runs if r["mode"] == m] for m in ("on", "off")}
    med = {m: statistics.median(v) for m, v in by_mode.items()}
    rounds = sorted({r["round"] for r in runs})
    paired = []
    for rnd in rounds:
        tps = {r["mode"]: r["tokens_per_s"] for r in runs if r["round"] == rnd}
        paired.append((tps["off"] - tps["on"]) / tps["off"] * 100.0)
    mean = statistics.fmean(paired)
    half = 1.96 * statistics.stdev(paired) / math.sqrt(len(paired)) if len(paired) > 1 else float("nan")
    return {"tokens_per_s_median": med, "cost_pct_of_medians": (med["off"] - med["on"]) / med["off"] * 100.0,
            "paired_cost_pct": paired, "paired_cost_pct_mean": mean, "paired_cost_pct_ci95": [mean - half, mean + half],
            "target_pct": TARGET_COST_PCT}


def markdown(meta: dict[str, Any], runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The results as a Markdown report."""
    med = summary["tokens_per_s_median"]
    lo, hi = summary["paired_cost_pct_ci95"]
    lines = [
        "# Cost of metrics: throughput with metrics on vs off" + (" (quick smoke run)" if meta["quick"] else ""),
        "",
        f"{meta['clients']} concurrent clients x {meta['requests_per_client']} requests x {meta['max_tokens']} "
        f"max tokens, model `{meta['source']}`, {meta['repeats']} interleaved rounds; CPU: {meta['cpu']}, "
        f"{meta['cpu_count']} cores; Python {meta['python']}.",
        "",
        "| metrics | median tokens/s | runs (tokens/s) |",
        "|---|---:|---|",
    ]
    for mode in ("off", "on"):
        vals = ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs if r["mode"] == mode)
        lines.append(f"| {mode} | {med[mode]:.1f} | {vals} |")
    lines += [
        "",
        f"Cost (medians): **{summary['cost_pct_of_medians']:.2f}%**. Paired per round: mean "
        f"{summary['paired_cost_pct_mean']:.2f}%, 95% interval [{lo:.2f}%, {hi:.2f}%]. "
        f"Target: <= {summary['target_pct']:.0f}%. A negative cost is noise.",
        "",
        f"Metrics path live in the 'on' fleet: {json.dumps(meta.get('on_fleet_metrics', {}), sort_keys=True)}",
        "",
        "Worker telemetry, in-process (microseconds per call): "
        + ", ".join(f"{k} {v:.2f}" for k, v in meta["micro_us"].items())
        + ". Per request of 64 tokens that is one request event, about 64 step calls and a share of the "
        "step events flushed every 0.1 s.",
    ]
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved measurement and write the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds, each measuring on and off")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--source", default="demo", help="model source (default: the built-in demo model)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds of tiny requests")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.requests_per_client, args.max_tokens = 2, 1, 8

    fleets = {mode: start_fleet(mode, args.source, _free_port()) for mode in ("off", "on")}
    runs: list[dict[str, Any]] = []
    try:
        for fleet in fleets.values():  # warm-up: load paths, caches, first-request costs
            measure(fleet, args.clients, 1, 8)
        for rnd in range(args.repeats):
            for mode in (("on", "off") if rnd % 2 == 0 else ("off", "on")):
                result = measure(fleets[mode], args.clients, args.requests_per_client, args.max_tokens)
                runs.append({"round": rnd, "mode": mode, **result})
                print(f"round {rnd} metrics {mode:>3}: {result['tokens_per_s']:8.1f} tokens/s", flush=True)
        on_metrics = metrics_health(fleets["on"])
    finally:
        for fleet in fleets.values():
            stop_fleet(fleet)

    summary = summarize(runs)
    micro = micro_costs(2000 if args.quick else 20000)
    meta = {"micro_us": micro, "clients": args.clients, "requests_per_client": args.requests_per_client, "max_tokens": args.max_tokens,
            "source": args.source, "repeats": args.repeats, "quick": args.quick, "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "on_fleet_metrics": on_metrics}
    name = "metrics_cost_quick" if args.quick else "metrics_cost"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"meta": meta, "runs": runs, "summary": summary}, indent=2) + "\n")
    report = markdown(meta, runs, summary)
    (RESULTS_DIR / f"{name}.md").write_text(report)
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
