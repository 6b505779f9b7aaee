"""Soak test: many concurrent clients against `demo` for minutes, with random cancels and timeouts.

Each client loops until the end: most requests run to completion; some break
out of their stream (cancel), some carry a short ``timeout_s`` (the fleet's
timeout), some are abandoned locally (task cancellation). Reported:

- requests by outcome; **lost** requests, which got no terminal reply at all
  (the client's own timeout fired); requests still open in the fleet at the end;
- **crashes**: child processes of the fleet that died (supervisor restarts);
- latency percentiles of completed requests;
- RSS of the broker and of every worker over time, and its growth after warm-up.

With ``--kill-broker-every-s S`` (its own fleet only) the broker is killed with SIGKILL
every S seconds, and part of the load is streams that record when each chunk came. The
report adds each kill, the streams it caught and the p99 stall they saw
(:mod:`benchmarks.soak_kills`); requests that ended ``unavailable`` or ``worker_lost``
count as lost (the target is 0), and the kills are not counted as crashes.

Writes ``benchmarks/results/<name>.json`` and ``.md`` (name ``soak`` by default).
Not run in CI.

    python -m benchmarks soak [--duration-s 300] [--clients 64] [--replicas 1] [--connect ADDR] [--quick] [--out DIR]
    python -m benchmarks soak --kill-broker-every-s 30 --replicas 2 --name soak_broker_kills

``--quick`` is a 20-second smoke run (written as ``soak_quick``): it shows the code
works end to end; RSS growth needs the full run's warm-up and length.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import zmq.asyncio

from actors.config import FleetConfig, ModelSpec
from actors.stats import percentile
from benchmarks.common import Report, add_out_argument, environment, progress
from benchmarks.soak_kills import kill_every, kills_markdown, stalls_by_kill
from mlx_fleet.client import AsyncClient, FleetError
from mlx_fleet.embedded import BackgroundFleet

LOCAL_NO_ANSWER = "no answer from"  # the client's own timeout: the fleet never replied
KILL_LOST = ("unavailable", "worker_lost")  # with broker kills: a request the recovery did not save


class Tally:
    """Outcomes and latencies of every request, shared by all client tasks."""

    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.done_latency_s: list[float] = []
        self.errors: list[str] = []
        self.streams: list[list[float]] = []  # each whole stream's start, chunk and end times (monotonic)

    def record(self, outcome: str, latency_s: float | None = None, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if latency_s is not None:
            self.done_latency_s.append(latency_s)
        if detail and len(self.errors) < 20:
            self.errors.append(f"{outcome}: {detail}")


async def one_request(client: AsyncClient, rng: random.Random, tally: Tally, *, streams: bool = False) -> None:
    """One request of a randomly chosen kind, recorded in ``tally``; ``streams`` adds whole timed streams."""
    prompt = f"Soak {rng.randrange(10**6)}: " + rng.choice(["tell a story", "list queues", "é ü 日本", "count"])
    kinds, weights = ["complete", "stream_cancel", "fleet_timeout", "local_abort", "stream"], [70, 10, 10, 10, 0]
    if streams:
        weights = [45, 10, 10, 10, 25]
    kind = rng.choices(kinds, weights)[0]
    start_s = time.monotonic()
    try:
        if kind == "stream":
            events = [start_s]
            async with client.stream(prompt, model="demo", max_tokens=rng.randrange(32, 128)) as stream:
                async for _ in stream:
                    events.append(time.monotonic())
            events.append(time.monotonic())
            tally.streams.append(events)
            tally.record("done", events[-1] - start_s)
        elif kind == "complete":
            await client.generate(prompt, model="demo", max_tokens=rng.randrange(8, 64),
                                  temperature=rng.choice([0.0, 0.7]))
            tally.record("done", time.monotonic() - start_s)
        elif kind == "stream_cancel":
            stop_after = rng.randrange(1, 6)
            stream = client.stream(prompt, model="demo", max_tokens=256)
            seen = 0
            async with stream:  # leaving it early sends the cancel now, not at garbage collection
                async for _ in stream:
                    seen += 1
                    if seen >= stop_after:
                        tally.record("client_cancel")
                        break
            if stream.completion is not None:
                tally.record("done", time.monotonic() - start_s)
        elif kind == "fleet_timeout":
            await client.generate(prompt, model="demo", max_tokens=512, timeout_s=rng.uniform(0.05, 0.5))
            tally.record("done", time.monotonic() - start_s)
        else:
            await asyncio.wait_for(client.generate(prompt, model="demo", max_tokens=256), rng.uniform(0.05, 0.5))
            tally.record("done", time.monotonic() - start_s)
    except asyncio.TimeoutError:
        tally.record("client_abort")
    except FleetError as exc:
        if exc.code == "timeout" and exc.message.startswith(LOCAL_NO_ANSWER):
            tally.record("lost", detail=exc.message)
        else:
            tally.record(exc.code, detail="" if exc.code in ("timeout", "overloaded") else exc.message)


async def client_loop(addr: str, ctx: zmq.asyncio.Context, seed: int, stop_at_s: float, tally: Tally,
                      request_timeout_s: float, streams: bool = False) -> None:
    """One simulated client: its own connection, requests back to back until ``stop_at_s``."""
    rng = random.Random(seed)
    async with AsyncClient(addr, timeout_s=request_timeout_s, ctx=ctx) as client:
        while time.monotonic() < stop_at_s:
            await one_request(client, rng, tally, streams=streams)


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, or None if it is gone (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


async def sampler(addr: str, ctx: zmq.asyncio.Context, every_s: float, t0_s: float, stop: asyncio.Event,
                  samples: list[dict[str, Any]]) -> None:
    """Every ``every_s``: the fleet's pids from `status`, their RSS, open requests and restarts."""
    async with AsyncClient(addr, timeout_s=10.0, ctx=ctx) as client:
        while not stop.is_set():
            try:
                st = await client.status()
                workers = {w["worker_id"]: {"pid": w["pid"], "rss_kib": rss_kib(w["pid"]), "restarts": w.get("restarts", 0)}
                           for m in st["models"].values() for w in m["workers"]}
                # The workers' info (BLAS, versions) once, in the first sample that has it.
                have_info = any(x.get("worker_info") for x in samples)
                info = {} if have_info else {w["worker_id"]: (w.get("info") or {})
                                             for m in st["models"].values() for w in m["workers"]}
                samples.append({"t_s": round(time.monotonic() - t0_s, 1), "requests_open": st["requests"],
                                "worker_info": info,
                                "broker": {"pid": st["broker"]["pid"], "rss_kib": rss_kib(st["broker"]["pid"]),
                                           "restarts": st["broker"].get("restarts", 0)},
                                "workers": workers, "counters": st["counters"]})
            except FleetError as exc:
                samples.append({"t_s": round(time.monotonic() - t0_s, 1), "error": str(exc)})
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except asyncio.TimeoutError:
                pass


async def soak(addr: str, args: argparse.Namespace, broker_pid: Callable[[], int | None] | None = None) -> dict[str, Any]:
    """Run the clients and the sampler (and, given ``broker_pid``, the broker killer); return the raw results."""
    ctx = zmq.asyncio.Context()
    tally = Tally()
    samples: list[dict[str, Any]] = []
    kills_s: list[float] = []
    t0_s = time.monotonic()
    stop = asyncio.Event()
    sample_task = asyncio.create_task(sampler(addr, ctx, args.sample_s, t0_s, stop, samples))
    killing = broker_pid is not None and args.kill_broker_every_s > 0
    clients = [client_loop(addr, ctx, args.seed + i, t0_s + args.duration_s, tally, args.request_timeout_s,
                           streams=killing) for i in range(args.clients)]
    if killing:
        assert broker_pid is not None
        clients.append(kill_every(args.kill_broker_every_s, t0_s + args.duration_s, broker_pid, kills_s))
    await asyncio.gather(*clients)
    elapsed_s = time.monotonic() - t0_s
    open_at_end = await settle(addr, ctx)
    stop.set()
    await sample_task
    ctx.term()
    return {"tally": tally, "samples": samples, "elapsed_s": elapsed_s, "open_at_end": open_at_end,
            "kills": stalls_by_kill(kills_s, tally.streams, t0_s) if killing else None}


async def settle(addr: str, ctx: zmq.asyncio.Context, within_s: float = 30.0) -> int:
    """Requests the fleet still holds once every client has stopped (0 is the goal)."""
    deadline_s = time.monotonic() + within_s
    async with AsyncClient(addr, timeout_s=10.0, ctx=ctx) as client:
        while True:
            open_now = (await client.status())["requests"]
            if open_now == 0 or time.monotonic() >= deadline_s:
                return open_now
            await asyncio.sleep(0.2)  # polling the fleet until it drains; bounded by deadline_s


def rss_growth(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, float | None]:
    """RSS growth per process from the first sample after warm-up to the last (same pid only)."""
    ok = [s for s in samples if "broker" in s and s["t_s"] >= warmup_s]
    if len(ok) < 2:
        return {}
    first, last = ok[0], ok[-1]
    out: dict[str, float | None] = {}
    pairs = [("broker", first["broker"], last["broker"])]
    pairs += [(f"worker:{wid}", w, last["workers"].get(wid, {})) for wid, w in first["workers"].items()]
    for name, a, b in pairs:
        same = a.get("pid") == b.get("pid") and a.get("rss_kib") and b.get("rss_kib")
        out[name] = round((b["rss_kib"] - a["rss_kib"]) / a["rss_kib"], 4) if same else None
    return out


def summarize(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The results: totals, crashes, lost, latency and the RSS series."""
    tally: Tally = raw["tally"]
    last = next((s for s in reversed(raw["samples"]) if "broker" in s), {})
    kills = raw.get("kills")
    crashes = last.get("broker", {}).get("restarts", 0) + sum(w["restarts"] for w in last.get("workers", {}).values())
    crashes = max(0, crashes - len(kills or []))  # the kills asked for are not crashes
    total = sum(tally.outcomes.values())
    lost = tally.outcomes.get("lost", 0) + (sum(tally.outcomes.get(c, 0) for c in KILL_LOST) if kills is not None else 0)
    lat = sorted(tally.done_latency_s)
    warmup_s = min(args.warmup_s, args.duration_s / 4)
    return {
        "elapsed_s": round(raw["elapsed_s"], 1), "requests": total, "outcomes": dict(tally.outcomes),
        "completed": tally.outcomes.get("done", 0), "kills": kills,
        "lost": lost, "open_at_end": raw["open_at_end"], "crashes": crashes,
        "crash_rate": crashes / total if total else 0.0,
        "done_latency_s": {q: round(percentile(lat, q), 3) for q in (50, 90, 99)} if lat else {},
        "throughput_rps": round(total / raw["elapsed_s"], 1) if raw["elapsed_s"] else 0.0,
        "warmup_s": warmup_s, "rss_growth_after_warmup": rss_growth(raw["samples"], warmup_s),
        "error_examples": tally.errors, "samples": raw["samples"],
    }


def markdown(doc: dict[str, Any]) -> str:
    """A short report: totals, then RSS over time."""
    lines = ["| requests | req/s | crashes | crash rate | lost | open at end | p50 s | p99 s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {doc['requests']} | {doc['throughput_rps']} | {doc['crashes']} | {doc['crash_rate']:.2%} | "
             f"{doc['lost']} | {doc['open_at_end']} | {doc['done_latency_s'].get(50, '-')} | "
             f"{doc['done_latency_s'].get(99, '-')} |", "",
             "Outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(doc["outcomes"].items())) + ".", "",
             "The seed (bare MLX, no supervision) claims about 15% crashes under load; the figure above is ours.", ""]
    if doc.get("kills") is not None:
        lines += [f"Broker killed (SIGKILL) {len(doc['kills'])} times: {doc['completed']} requests completed, "
                  f"{doc['lost']} lost (target 0). The stall is the gap a stream saw across a kill.", "",
                  *kills_markdown(doc["kills"]), ""]
    growth = ", ".join(f"{k} {v:+.2%}" if v is not None else f"{k} (restarted)"
                       for k, v in doc["rss_growth_after_warmup"].items()) or "not enough samples"
    lines += [f"RSS growth after {doc['warmup_s']:.0f} s warm-up: {growth} (target < 5%).", "",
              "| t (s) | open | broker RSS (MiB) | worker RSS (MiB) |", "|---:|---:|---:|---|"]
    samples = [s for s in doc["samples"] if "broker" in s]
    step = max(1, len(samples) // 20)
    for s in samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else []):
        workers = ", ".join(f"{wid} {w['rss_kib'] / 1024:.1f}" for wid, w in sorted(s["workers"].items()) if w["rss_kib"])
        broker = s["broker"]["rss_kib"] / 1024 if s["broker"]["rss_kib"] else float("nan")
        lines.append(f"| {s['t_s']:.0f} | {s['requests_open']} | {broker:.1f} | {workers} |")
    return "\n".join(lines) + "\n"


def own_fleet_config(replicas: int, log_level: str) -> tuple[FleetConfig, str]:
    """`demo` on fresh ipc endpoints; metrics and the HTTP gateway off."""
    ipc_dir = tempfile.mkdtemp(prefix="mlxf-soak-", dir="/tmp")
    cfg = FleetConfig(frontend=f"ipc://{ipc_dir}/front", backend=f"ipc://{ipc_dir}/back", metrics_export=False,
                      http_port=0, log_level=log_level, models=(ModelSpec("demo", "demo", replicas),))
    return cfg, ipc_dir


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the soak, write JSON and Markdown; exit 1 on any crash, lost or leaked request."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=300.0, help="how long clients keep sending (default 300)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--replicas", type=int, default=1, help="demo replicas when starting our own fleet")
    p.add_argument("--connect", help="soak a running fleet at ADDR instead of starting one")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling interval (default 5)")
    p.add_argument("--warmup-s", type=float, default=60.0, help="RSS growth is measured after this (capped at 1/4)")
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="a client's own wait before 'lost'")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--name", default="soak", help="results file name (default soak)")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--quick", action="store_true", help="20 s smoke run (not a result)")
    p.add_argument("--kill-broker-every-s", type=float, default=0.0,
                   help="SIGKILL the broker this often (own fleet only); report lost requests and stream stalls")
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.kill_broker_every_s and args.connect is not None:
        p.error("--kill-broker-every-s needs the soak's own fleet (drop --connect)")
    if args.quick:
        args.duration_s, args.sample_s, args.name = 20.0, 2.0, args.name + "_quick"
    if args.connect is not None:
        raw = asyncio.run(soak(args.connect, args))
    else:
        cfg, ipc_dir = own_fleet_config(args.replicas, args.log_level)
        with BackgroundFleet(cfg, ipc_dir) as fleet:
            progress(f"fleet up: demo x{args.replicas}; {args.clients} clients for {args.duration_s:g}s"
                     + (f", killing the broker every {args.kill_broker_every_s:g}s" if args.kill_broker_every_s else ""))

            def broker_pid() -> int | None:
                return fleet.child("broker").pid if fleet.child("broker").alive else None

            raw = asyncio.run(soak(cfg.frontend, args, broker_pid))
    doc = summarize(raw, args)
    infos = next((s["worker_info"] for s in raw["samples"] if s.get("worker_info")), {})
    blas = next((info.get("blas") for info in infos.values()), None)
    report = Report(args.name, f"Soak: {args.clients} clients x {doc['elapsed_s']:.0f} s against `demo` "
                    f"({args.replicas} replica(s))", environment(blas, "demo"),
                    {k: v for k, v in vars(args).items() if k != "out"})
    report.results = doc
    report.add_markdown(markdown(doc))
    json_path, md_path = report.write(args.out)
    print(md_path.read_text(), end="")
    progress(f"wrote {json_path} and {md_path}")
    return 0 if doc["crashes"] == 0 and doc["lost"] == 0 and doc["open_at_end"] == 0 else 1


if __name__ == "__main__":
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    raise SystemExit(main())
