"""The HTTP gateway's overhead: OpenAI HTTP gateway vs the direct ZeroMQ client vs mlx_lm.server.

One run, one model, the same prompts and sampling for every target:

- ``zmq``: ``broker.client.AsyncClient`` straight to the broker (the fleet's native path);
- ``gateway``: streamed ``POST /v1/completions`` to the fleet's HTTP gateway;
- ``mlx_lm.server``: the same HTTP requests to ``python -m mlx_lm.server`` on the same
  model folder and BLAS, started and stopped by this script.

All three are up together; at every ``--clients`` level the targets take turns in
blocks of closed-loop load (each client sends its next request when its last one ends),
so that background load on the machine weighs on each alike. TTFT is the time from
sending to the first non-empty text; tok/s is a target's completion tokens over the
wall time of its blocks. The gateway's overhead is reported against the ZeroMQ client
(and against mlx_lm.server), in ms and %, at TTFT p50/p99 and in aggregate tok/s.
Writes ``benchmarks/results/gateway_overhead.{json,md}``.

    python benchmarks/gateway_overhead.py [--model demo-small] [--clients 1 16] [--requests 64] [--max-tokens 64]
    python benchmarks/gateway_overhead.py --quick   # a smoke run (seconds); writes *_quick.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import aiohttp  # noqa: E402  (after the sys.path line, like the project imports)

from actors.config import BatchingConfig, FleetConfig, ModelSpec  # noqa: E402
from actors.stats import percentile  # noqa: E402
from broker.client import AsyncClient, Completion, FleetError, StreamChunk  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MODEL_NAME = "bench"
TARGETS = ("zmq", "gateway", "mlx_lm.server")
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a message broker routes requests to workers.",
    "List three reasons to batch requests on a GPU.",
    "Once upon a time, in a city of queues and workers,",
    "Summarize the plot of a mystery novel in two sentences.",
    "What is the capital of France? Answer in one word.",
    "Translate 'good morning' into Spanish, French and German.",
]
START_TIMEOUT_S = 300.0


@dataclass
class Sample:
    """One request as its client saw it."""

    ttft_s: float
    total_s: float
    completion_tokens: int
    error: str | None = None


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- one request per target -------------------------------------------------------------


async def zmq_request(client: AsyncClient, prompt: str, max_tokens: int) -> Sample:
    """A streamed request through the native ZeroMQ client."""
    start_s = time.perf_counter()
    ttft_s = 0.0
    try:
        async for item in client.stream(prompt, model=MODEL_NAME, max_tokens=max_tokens, temperature=0.0):
            if isinstance(item, StreamChunk) and item.text and not ttft_s:
                ttft_s = time.perf_counter() - start_s
            elif isinstance(item, Completion):
                return Sample(ttft_s, time.perf_counter() - start_s, int(item.usage.get("completion_tokens", 0)))
    except FleetError as exc:
        return Sample(0.0, time.perf_counter() - start_s, 0, str(exc))
    return Sample(0.0, time.perf_counter() - start_s, 0, "stream ended without a completion")


async def http_request(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    """A streamed ``/v1/completions`` request over HTTP (the gateway or mlx_lm.server)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    start_s = time.perf_counter()
    ttft_s = 0.0
    tokens = 0
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                return Sample(0.0, time.perf_counter() - start_s, 0, f"HTTP {resp.status}: {(await resp.text())[:200]}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[len(b"data: "):])
                if event.get("error"):
                    return Sample(0.0, time.perf_counter() - start_s, 0, str(event["error"])[:200])
                if event.get("usage"):
                    tokens = int(event["usage"].get("completion_tokens", 0))
                choices = event.get("choices") or []
                if choices and choices[0].get("text") and not ttft_s:
                    ttft_s = time.perf_counter() - start_s
    except aiohttp.ClientError as exc:
        return Sample(0.0, time.perf_counter() - start_s, 0, f"{type(exc).__name__}: {exc}")
    return Sample(ttft_s, time.perf_counter() - start_s, tokens)


# ---- interleaved closed-loop load ------------------------------------------------------------

Target = Callable[[str], Awaitable[Sample]]


async def run_block(one: Target, clients: int, per_client: int, offset: int) -> tuple[list[Sample], float]:
    """``clients`` concurrent closed loops of ``per_client`` requests; returns samples and wall time."""
    samples: list[Sample] = []

    async def loop(c: int) -> None:
        for i in range(per_client):
            samples.append(await one(PROMPTS[(offset + c * per_client + i) % len(PROMPTS)]))

    start_s = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in range(clients)))
    return samples, time.perf_counter() - start_s


def summarize(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    """TTFT percentiles (ms), aggregate tok/s, counts."""
    ok = [s for s in samples if s.error is None and s.ttft_s > 0]
    ttft_ms = [s.ttft_s * 1000.0 for s in ok] or [float("nan")]
    tokens = sum(s.completion_tokens for s in ok)
    return {
        "requests": len(samples), "errors": len(samples) - len(ok),
        "first_error": next((s.error for s in samples if s.error), None),
        "ttft_p50_ms": percentile(ttft_ms, 50), "ttft_p99_ms": percentile(ttft_ms, 99),
        "latency_p50_ms": percentile([s.total_s * 1000.0 for s in ok] or [float("nan")], 50),
        "completion_tokens": tokens, "wall_s": wall_s, "tok_s": tokens / wall_s if wall_s > 0 else 0.0,
    }


async def measure(targets: dict[str, Target], levels: list[int], requests: int, per_client: int,
                  warmup: int) -> dict[str, dict[str, Any]]:
    """Warm every target up, then at each level run blocks of load, the targets taking turns.

    Turns (in an order that rotates every block) rather than one target after another,
    so that a noisy neighbour on the machine weighs on every target alike.
    """
    for one in targets.values():
        for i in range(warmup):
            await one(PROMPTS[i % len(PROMPTS)])
    out: dict[str, dict[str, Any]] = {name: {} for name in targets}
    names = list(targets)
    for clients in levels:
        blocks = max(1, -(-requests // (clients * per_client)))
        samples: dict[str, list[Sample]] = {name: [] for name in names}
        wall_s = dict.fromkeys(names, 0.0)
        for b in range(blocks):
            for name in names[b % len(names):] + names[: b % len(names)]:
                got, took_s = await run_block(targets[name], clients, per_client, b)
                samples[name] += got
                wall_s[name] += took_s
        for name in names:
            out[name][str(clients)] = summary = summarize(samples[name], wall_s[name])
            print(f"{name:>14} {clients:>3} clients: TTFT p50 {summary['ttft_p50_ms']:.1f} ms, "
                  f"p99 {summary['ttft_p99_ms']:.1f} ms, {summary['tok_s']:.1f} tok/s, {summary['errors']} errors",
                  file=sys.stderr)
    return out


# ---- the targets' processes ------------------------------------------------------------------


@contextlib.contextmanager
def running_fleet(source: str, capacity: int) -> Iterator[FleetConfig]:
    """A fleet serving ``source`` as ``bench`` with its HTTP gateway, on loopback tcp."""
    from actors.supervisor import Supervisor

    batching = BatchingConfig(decode_capacity=capacity)
    cfg = FleetConfig(frontend=f"tcp://127.0.0.1:{free_port()}", backend=f"tcp://127.0.0.1:{free_port()}",
                      metrics_export=False, http_port=free_port(), ready_timeout_s=START_TIMEOUT_S,
                      drain_timeout_s=5.0, models=(ModelSpec(MODEL_NAME, source, 1, batching),), batching=batching,
                      log_level="WARNING")
    sup = Supervisor(cfg)
    try:
        sup.start()
        threading.Thread(target=sup.run, daemon=True).start()
        yield cfg
    finally:
        sup.request_stop()
        sup.shutdown()


@contextlib.contextmanager
def running_mlx_lm_server(folder: Path, capacity: int) -> Iterator[str]:
    """``python -m mlx_lm.server`` on the same folder and BLAS; yields its base URL."""
    from workers.blas import blas_env, find_blas

    port = free_port()
    env = {**os.environ, **blas_env(find_blas("auto"))}
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port),
           "--decode-concurrency", str(capacity), "--log-level", "WARNING"]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as log_file:  # a pipe could fill up and stall the server
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
        try:
            deadline_s = time.monotonic() + START_TIMEOUT_S
            while not _answers(base + "/v1/models"):
                if proc.poll() is not None or time.monotonic() > deadline_s:
                    log_file.seek(0)
                    raise RuntimeError(f"mlx_lm.server did not come up (exit {proc.returncode}): {log_file.read()[-500:]}")
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


async def measure_all(cfg: FleetConfig, mlx_lm_url: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Every target, interleaved, over one AsyncClient and one HTTP session."""
    gateway_url = f"http://127.0.0.1:{cfg.http_port}/v1/completions"
    async with AsyncClient(cfg.frontend, timeout_s=600.0) as client, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        targets: dict[str, Target] = {
            "zmq": lambda p: zmq_request(client, p, args.max_tokens),
            "gateway": lambda p: http_request(session, gateway_url, MODEL_NAME, p, args.max_tokens),
        }
        if mlx_lm_url is not None:
            url = mlx_lm_url + "/v1/completions"
            targets["mlx_lm.server"] = lambda p: http_request(session, url, "default_model", p, args.max_tokens)
        return await measure(targets, args.clients, args.requests, args.per_client, args.warmup)


# ---- report --------------------------------------------------------------------------------------


def _delta(new: float, base: float) -> dict[str, float]:
    return {"ms": new - base, "pct": (new - base) / base * 100.0 if base else float("nan")}


def overhead(results: dict[str, Any], levels: list[int], base: str) -> dict[str, Any]:
    """The gateway against ``base`` at each level: TTFT p50/p99 in ms and %, tok/s in %."""
    out: dict[str, Any] = {}
    for clients in map(str, levels):
        g, b = results["gateway"][clients], results[base][clients]
        out[clients] = {
            "ttft_p50": _delta(g["ttft_p50_ms"], b["ttft_p50_ms"]),
            "ttft_p99": _delta(g["ttft_p99_ms"], b["ttft_p99_ms"]),
            "tok_s_pct": (g["tok_s"] - b["tok_s"]) / b["tok_s"] * 100.0 if b["tok_s"] else float("nan"),
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    """The Markdown page for the report."""
    c, levels = report["config"], report["config"]["clients"]
    lines = [
        "# HTTP gateway overhead",
        "",
        f"Model `{c['model']}`; {c['requests']} streamed completions per level ({c['max_tokens']} max tokens, greedy); "
        f"clients {', '.join(map(str, levels))}; {c['mode']} run. {report['env']['cpu']}, mlx {report['env']['mlx']}, "
        f"mlx-lm {report['env']['mlx_lm']}, aiohttp {report['env']['aiohttp']}.",
        "",
        "| target | clients | TTFT p50 (ms) | TTFT p99 (ms) | latency p50 (ms) | tok/s | requests | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in map(str, levels):
        for target in TARGETS:
            r = report["results"].get(target, {}).get(clients)
            if r:
                lines.append(f"| {target} | {clients} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
                             f"{r['latency_p50_ms']:.1f} | {r['tok_s']:.1f} | {r['requests']} | {r['errors']} |")
    for base, title in (("zmq", "the direct ZeroMQ client"), ("mlx_lm.server", "mlx_lm.server")):
        if base not in report["overhead"]:
            continue
        lines += ["", f"Gateway vs {title} (positive TTFT = the gateway is slower; negative tok/s = the gateway is slower):", "",
                  "| clients | TTFT p50 | TTFT p99 | aggregate tok/s |", "|---:|---:|---:|---:|"]
        for clients, o in report["overhead"][base].items():
            lines.append(f"| {clients} | {o['ttft_p50']['ms']:+.2f} ms ({o['ttft_p50']['pct']:+.1f}%) | "
                         f"{o['ttft_p99']['ms']:+.2f} ms ({o['ttft_p99']['pct']:+.1f}%) | {o['tok_s_pct']:+.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON and Markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo-small", help="a built-in demo size (demo, demo-small) or an MLX model folder")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=64, help="requests per level (at least one per client)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends in one turn of a target")
    p.add_argument("--warmup", type=int, default=4, help="requests before measuring each target")
    p.add_argument("--skip-mlx-lm-server", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: few short requests; writes *_quick files")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens, args.warmup, args.per_client = 16, 8, 1, 1

    from workers.demo_model import DEMO_SIZES, ensure_demo_model

    folder = ensure_demo_model(args.model) if args.model in DEMO_SIZES else Path(args.model)
    source = args.model if args.model in DEMO_SIZES else str(folder)
    capacity = max(args.clients)
    with running_fleet(source, capacity) as cfg, contextlib.ExitStack() as stack:
        mlx_lm_url = None if args.skip_mlx_lm_server else stack.enter_context(running_mlx_lm_server(folder, capacity))
        results = asyncio.run(measure_all(cfg, mlx_lm_url, args))
    report = {
        "config": {"model": args.model, "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
                   "per_client": args.per_client, "warmup": args.warmup, "mode": "quick (smoke)" if args.quick else "full"},
        "env": {"cpu": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
                "mlx": version("mlx"), "mlx_lm": version("mlx-lm"), "aiohttp": version("aiohttp"), "pyzmq": version("pyzmq")},
        "results": results,
        "overhead": {base: overhead(results, args.clients, base) for base in ("zmq", "mlx_lm.server") if base in results},
    }
    stem = "gateway_overhead_quick" if args.quick else "gateway_overhead"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
