"""Per-request overhead of serving: the fleet against in-process mlx-lm, side by side.

The same 50 questions run sequentially (one client, greedy, ``max_tokens`` each)
through the fleet and through ``mlx_lm.stream_generate`` in this process. The two
alternate request by request, so drift in the machine's load hits both equally.
Both use the same BLAS, loaded here before MLX.

    python -m benchmarks overhead [--model demo-small] [--requests 50] [--max-tokens 50] [--quick] [--out DIR]

The worker's solo fast path follows ``MLX_FLEET_SOLO_FAST_PATH`` (default on), or
``--solo-fast-path on|off``; the table's parameters say what the worker reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections import Counter
from typing import Any, Callable

from workers.blas import describe_blas, find_blas, preload_blas

preload_blas(find_blas("auto"))  # before anything imports mlx

from actors.config import BatchingConfig, FleetConfig, ModelSpec, parse_bool  # noqa: E402
from benchmarks import plots  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Report, Summary, add_out_argument, environment, fmt_ms, progress, cycled_questions, ratio, served_name,
)
from benchmarks.fleet_probe import ENGINE_NOTE, FleetProbe, engine_table  # noqa: E402
from mlx_fleet.client import Client  # noqa: E402
from mlx_fleet.embedded import BackgroundFleet  # noqa: E402


def local_config(model: str, batching: BatchingConfig | None = None, replicas: int = 1, *, source: str | None = None,
                 **overrides: Any) -> tuple[FleetConfig, str]:
    """A fleet on fresh ipc endpoints serving ``model`` (from ``source``, default the name), metrics and HTTP gateway off."""
    ipc_dir = tempfile.mkdtemp(prefix="mlxf-bench-", dir="/tmp")
    b = batching or BatchingConfig()
    cfg = FleetConfig(frontend=f"ipc://{ipc_dir}/front", backend=f"ipc://{ipc_dir}/back", metrics_export=False,
                      http_port=0, models=(ModelSpec(model, source or model, replicas, b),), batching=b)
    return dataclasses.replace(cfg, **overrides), ipc_dir


@dataclasses.dataclass
class Sample:
    """One request: time to first token and total latency, in seconds."""

    ttft_s: float
    total_s: float
    tokens: int
    token_ids: list[int]
    path: str = ""  # served only: how the worker decoded it (solo | batch | handoff)


def run_in_process(model: Any, tokenizer: Any, prompt: str | list[int], max_tokens: int) -> Sample:
    """mlx-lm's own streaming loop, greedy."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=0.0)
    t0 = time.perf_counter()
    ttft = 0.0
    ids: list[int] = []
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler):
        if not ttft:
            ttft = time.perf_counter() - t0
        if r.finish_reason != "stop":
            ids.append(r.token)
    return Sample(ttft, time.perf_counter() - t0, len(ids), ids)


def run_served(client: Client, model: str, prompt: str | None, max_tokens: int, **options: Any) -> Sample:
    """The same request through the broker and a worker (``options``: e.g. ``messages`` instead of a prompt)."""
    t0 = time.perf_counter()
    ttft = 0.0
    stream = client.stream(prompt, model=model, max_tokens=max_tokens, **options)
    for _ in stream:
        if not ttft:
            ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    assert stream.completion is not None
    return Sample(ttft or total, total, len(stream.completion.token_ids), stream.completion.token_ids,
                  str(stream.completion.timings.get("path", "")))


def compare(bare: list[Sample], served: list[Sample]) -> dict[str, Any]:
    """Differences (ms) and ratios of served against bare, and how many pairs' greedy tokens differ."""
    out: dict[str, Any] = {"token_mismatches": sum(b.token_ids != s.token_ids for b, s in zip(bare, served))}
    for metric, pick in (("ttft", lambda s: s.ttft_s), ("total", lambda s: s.total_s)):
        b, s = Summary.of(pick(x) for x in bare), Summary.of(pick(x) for x in served)
        paired = Summary.of(pick(y) - pick(x) for x, y in zip(bare, served))
        out[metric] = {"bare": b, "served": s, "paired_diff": paired,
                       "diff_ms": {k: (getattr(s, k) - getattr(b, k)) * 1000 for k in ("mean", "median", "p95", "p99")},
                       "ratio": {k: ratio(getattr(s, k), getattr(b, k)) for k in ("mean", "median", "p95", "p99")}}
    return out


def alternate(bare: Callable[[str], Sample], served: Callable[[str], Sample], qs: list[str],
              deadline: float | None) -> tuple[list[Sample], list[Sample]]:
    """Each question through both, alternating which goes first; no pair starts past ``deadline``."""
    out: tuple[list[Sample], list[Sample]] = ([], [])
    longest = 0.0
    for i, q in enumerate(qs):
        t_pair = time.monotonic()
        if deadline is not None and t_pair + longest * 1.5 > deadline:
            progress(f"overhead: deadline reached after {i} of {len(qs)} requests")
            break
        # Alternate which goes first, so neither always runs on a warmer cache.
        if i % 2 == 0:
            b, s = bare(q), served(q)
        else:
            s, b = served(q), bare(q)
        out[0].append(b)
        out[1].append(s)
        longest = max(longest, time.monotonic() - t_pair)
        if (i + 1) % 10 == 0:
            progress(f"overhead: {i + 1}/{len(qs)} requests")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and write benchmarks/results/overhead.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--name", default="overhead")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="start no request pair after this many seconds from the start (0: no deadline)")
    ap.add_argument("--solo-fast-path", type=parse_bool, default=parse_bool(os.environ.get("MLX_FLEET_SOLO_FAST_PATH", "on")),
                    help="the worker's solo fast path (default: MLX_FLEET_SOLO_FAST_PATH, else on)")
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): demo, 4 requests of 8 tokens")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.requests, args.max_tokens, args.warmup, args.name = "demo", 4, 8, 1, args.name + "_quick"

    from mlx_lm import load

    from workers.models.sources import resolve_source

    qs = cycled_questions(args.requests)
    model, tokenizer = load(str(resolve_source(args.model)))
    name = served_name(args.model)
    cfg, ipc_dir = local_config(name, BatchingConfig(solo_fast_path=args.solo_fast_path), source=args.model)
    deadline = time.monotonic() + args.deadline_s if args.deadline_s > 0 else None
    with BackgroundFleet(cfg, ipc_dir), Client(cfg.frontend, timeout_s=120) as client:
        for q in qs[: args.warmup]:
            run_in_process(model, tokenizer, q, args.max_tokens)
            run_served(client, name, q, args.max_tokens)
        probe = FleetProbe(client, name)
        before = probe.before()
        bare, served = alternate(lambda q: run_in_process(model, tokenizer, q, args.max_tokens),
                                 lambda q: run_served(client, name, q, args.max_tokens), qs, deadline)
        engine = probe.after(before)
        engine["cpu_s"]["client"] = None  # this process also ran the in-process requests
        worker_info = client.status()["models"][name]["workers"][0]["info"]
    worker_blas = worker_info["blas"]
    result = compare(bare, served)
    result["requests_done"] = len(served)
    result["engine"] = engine
    result["paths"] = dict(Counter(x.path for x in served))
    result["samples"] = {"bare": [dataclasses.asdict(s) | {"token_ids": None} for s in bare],
                         "served": [dataclasses.asdict(s) | {"token_ids": None} for s in served]}
    report = Report(args.name, "Serving overhead: fleet vs in-process mlx-lm (sequential)",
                    environment(describe_blas(), args.model),
                    {"requests": args.requests, "max_tokens": args.max_tokens, "warmup": args.warmup,
                     "policy": cfg.batching.policy, "window_ms": cfg.batching.window_ms,
                     "fast_path": cfg.batching.fast_path, "worker_blas": worker_blas.get("name"),
                     "solo_fast_path": worker_info.get("solo_fast_path")})
    report.results = result
    report.add_markdown(markdown(result, args))
    cdf = plots.latency_cdf({"bare (in-process)": [s.total_s for s in bare], "served (fleet)": [s.total_s for s in served]},
                            args.out / f"{args.name}_latency_cdf.png", title="Response time CDF, sequential")
    report.add_markdown(plots.plot_links([("response time CDF", cdf)]))
    report.publish(args.out)
    return result


def markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    """The results table."""
    lines = [f"{args.requests} sequential requests, {args.max_tokens} tokens each, greedy; "
             "bare = `mlx_lm.stream_generate` in the benchmark process; served = `Client.stream` "
             "through broker and worker (ipc://). Requests alternate between the two.\n",
             "| metric | bare (ms) | served (ms) | overhead (ms) | ratio |", "|---|---|---|---|---|"]
    for metric in ("ttft", "total"):
        m = r[metric]
        for k in ("mean", "median", "p95", "p99"):
            lines.append(f"| {metric} {k} | {fmt_ms(getattr(m['bare'], k))} | {fmt_ms(getattr(m['served'], k))} | "
                         f"{m['diff_ms'][k]:+.2f} | {m['ratio'][k]:.4f} |")
    pd = r["total"]["paired_diff"]
    lines.append(f"\nPaired per-request difference of total latency: mean {fmt_ms(pd.mean)} ms, "
                 f"median {fmt_ms(pd.median)} ms, stdev {fmt_ms(pd.stdev)} ms. "
                 f"Mean response overhead: {(r['total']['ratio']['mean'] - 1) * 100:+.2f}%. "
                 f"TTFT overhead p50: {r['ttft']['diff_ms']['median']:+.2f} ms.")
    lines.append(f"\nGreedy token mismatches between bare and served: {r['token_mismatches']} of {r['requests_done']}"
                 + ("" if r["requests_done"] == args.requests else f" (the deadline stopped it at {r['requests_done']} "
                                                                   f"of {args.requests} requests)") + ".")
    paths = ", ".join(f"{p} {n}" for p, n in sorted(r["paths"].items())) or "none reported"
    lines += [f"\nPaths of the served requests (their `done` timings): {paths}.", "",
              engine_table({"served": r["engine"]}, {"served": "served (fleet)"}), "", ENGINE_NOTE]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
