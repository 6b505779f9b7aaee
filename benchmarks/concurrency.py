"""Concurrency sweep: each batching policy against mlx_lm.server, same model, same BLAS.

Every system stays up for the whole run. Load levels are interleaved across
systems (level 1 on each, then level 2 on each, ...), so drift in the shared
machine's load spreads over all of them.

    python -m benchmarks concurrency [--model demo-small] [--levels 1,2,4,8,16,32] [--quick] [--out DIR]

Plots: aggregate tok/s and TTFT (p50, p99) against clients, and the latency CDF at
the highest level.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from workers.blas import blas_env, describe_blas, find_blas, preload_blas

BLAS = preload_blas(find_blas("auto"))  # before anything imports mlx

from actors.config import BatchingConfig, parse_capacity  # noqa: E402
from benchmarks import plots  # noqa: E402
from benchmarks.common import Report, add_out_argument, environment, progress, questions, served_name  # noqa: E402
from benchmarks.fleet_probe import ENGINE_NOTE, FleetProbe, engine_table  # noqa: E402
from benchmarks.load import MlxLmServer, fleet_requester, http_requester, run_load  # noqa: E402
from benchmarks.overhead import local_config  # noqa: E402
from mlx_fleet.client import Client  # noqa: E402
from mlx_fleet.embedded import BackgroundFleet  # noqa: E402

POLICIES: dict[str, dict[str, Any]] = {
    # The seed's policies, with no decode window.
    "immediate": {"policy": "immediate", "fast_path": False, "decode_window_ms": 0.0},
    "fixed": {"policy": "fixed", "fast_path": False, "decode_window_ms": 0.0},
    "fixed+fast_path": {"policy": "fixed", "fast_path": True, "decode_window_ms": 0.0},
    "adaptive": {"policy": "adaptive", "fast_path": True, "decode_window_ms": 0.0},
    # BatchingConfig's defaults, whatever they are at the time of the run.
    "default": {},
    "fixed+fast_path+dw50": {"policy": "fixed", "fast_path": True, "decode_window_ms": 50.0},
    "fixed+fast_path+dw25": {"policy": "fixed", "fast_path": True, "decode_window_ms": 25.0},
    "fixed+fast_path+dw100": {"policy": "fixed", "fast_path": True, "decode_window_ms": 100.0},
}
DEFAULT_POLICIES = "immediate,fixed,fixed+fast_path,adaptive,default"


def prompts_for(level: int, per_client: int, minimum: int, tag: str = "") -> list[str]:
    """The prompts of one level: ``per_client`` each, at least ``minimum``.

    Each prompt starts with a unique tag, so no system gets prompt-cache hits from
    an earlier level or from the warm-up: every request pays its full prefill.
    """
    qs = questions()
    n = max(level * per_client, minimum)
    return [f"({tag} {level}.{i}) {qs[i % len(qs)]}" for i in range(n)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep and write benchmarks/results/<name>.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--levels", default="1,2,4,8,16,32")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated, from: {', '.join(POLICIES)}")
    ap.add_argument("--max-tokens", type=int, default=50)
    ap.add_argument("--per-client", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--decode-capacity", type=lambda v: parse_capacity(v, "--decode-capacity"),
                    default=BatchingConfig.decode_capacity, help="auto (sized from memory; mlx_lm.server keeps its "
                    "default) or N for both")
    ap.add_argument("--admission-batch", type=int, default=BatchingConfig.admission_batch)
    ap.add_argument("--no-server", action="store_true", help="skip mlx_lm.server")
    ap.add_argument("--name", default="concurrency")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="start no run that would end after this many seconds from the start; the report is "
                         "written after every run (0: no deadline)")
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): demo, 1 and 2 clients, 8 tokens")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.levels, args.max_tokens, args.name = "demo", "1,2", 8, args.name + "_quick"
        args.per_client, args.min_requests = 1, 2
    levels = [int(x) for x in args.levels.split(",")]
    policies = args.policies.split(",")

    from workers.models.sources import resolve_source

    t_start = time.monotonic()
    model_path = str(resolve_source(args.model))
    results: dict[str, dict[int, Any]] = {}
    report = Report(args.name, "Concurrency sweep: batching policies vs mlx_lm.server", environment(describe_blas(), args.model),
                    {"levels": levels, "max_tokens": args.max_tokens, "per_client": args.per_client,
                     "min_requests": args.min_requests, "decode_capacity": args.decode_capacity,
                     "admission_batch": args.admission_batch, "deadline_s": args.deadline_s})

    def write(plotted: bool = False) -> tuple[Path, Path]:
        report.results, report.sections = results, []
        report.add_markdown(markdown(results, levels))
        if plotted:
            report.add_markdown(plots.plot_links(sweep_plots(results, levels, args.out, args.name)))
        return report.write(args.out)

    with contextlib.ExitStack() as stack:
        systems, probes = start_systems(stack, args, policies, model_path)
        for name, make in systems.items():  # warm-up: compile paths, fill caches
            run_load(make, 2, prompts_for(2, 1, 2, f"warm {name}"))
        longest = 0.0
        for level in levels:
            for name, make in systems.items():
                if args.deadline_s > 0 and time.monotonic() - t_start + longest * 1.2 + 5 > args.deadline_s:
                    progress(f"{name} @ {level} clients: skipped (deadline)")
                    continue
                t0, probe = time.monotonic(), probes.get(name)
                before = probe.before() if probe else None
                run = run_load(make, level, prompts_for(level, args.per_client, args.min_requests, name))
                longest = max(longest, time.monotonic() - t0)
                summary = run.summary()
                entry: dict[str, Any] = {"summary": summary, "samples": [x.__dict__ for x in run.samples]}
                if probe is not None and before is not None:
                    entry["engine"] = probe.after(before)
                results.setdefault(name, {})[level] = entry
                progress(f"{name} @ {level} clients: {summary['tok_per_s']:.1f} tok/s, "
                         f"TTFT p50 {1000 * (summary['ttft_p50_s'] or 0):.0f} ms, ok {summary['ok']}/{summary['requests']}")
                write()
    json_path, md_path = write(plotted=True)
    progress(f"wrote {json_path} and {md_path}")
    print(md_path.read_text())
    return results


def concurrency_args(capacity: int | str) -> list[str]:
    """mlx_lm.server's decode concurrency for the fleet's ``decode_capacity``: the same number, or its default for auto."""
    return [] if capacity == "auto" else ["--decode-concurrency", str(capacity)]


def start_systems(stack: contextlib.ExitStack, args: argparse.Namespace, policies: list[str],
                  model_path: str) -> tuple[dict[str, Any], dict[str, FleetProbe]]:
    """A fleet per policy (with a probe into its worker) and mlx_lm.server, all kept up."""
    systems: dict[str, Any] = {}
    probes: dict[str, FleetProbe] = {}
    served = served_name(args.model)
    for name in policies:
        b = BatchingConfig(decode_capacity=args.decode_capacity, admission_batch=args.admission_batch, **POLICIES[name])
        cfg, ipc_dir = local_config(served, b, source=model_path)
        stack.enter_context(BackgroundFleet(cfg, ipc_dir))
        systems[name] = fleet_requester(cfg.frontend, served, args.max_tokens)
        probes[name] = FleetProbe(stack.enter_context(Client(cfg.frontend, timeout_s=30)), served)
        progress(f"fleet up: {name}")
    if not args.no_server:
        server = stack.enter_context(MlxLmServer(model_path, env=blas_env(BLAS),
                                                 extra_args=[*concurrency_args(args.decode_capacity),
                                                             "--prompt-concurrency", str(args.admission_batch)]))
        systems["mlx_lm.server"] = http_requester(server.port, model_path, args.max_tokens)
        progress("mlx_lm.server up")
    return systems, probes


def markdown(results: dict[str, dict[int, Any]], levels: list[int]) -> str:
    """Tables per metric, plus the targets at 16 clients."""
    out = []
    metrics = [("aggregate tok/s", "tok_per_s", 1, "{:.1f}"), ("TTFT p50 (ms)", "ttft_p50_s", 1000, "{:.0f}"),
               ("TTFT p99 (ms)", "ttft_p99_s", 1000, "{:.0f}"), ("ITL p50 (ms)", "itl_p50_s", 1000, "{:.1f}"),
               ("ITL p99 (ms)", "itl_p99_s", 1000, "{:.1f}"), ("success rate", "success_rate", 1, "{:.3f}")]
    for title, key, scale, fmt in metrics:
        out.append(f"\n### {title}\n\n| system | " + " | ".join(f"{n} clients" for n in levels) + " |")
        out.append("|---|" + "---|" * len(levels))
        for name, by_level in results.items():
            cells = []
            for n in levels:
                v = by_level.get(n, {}).get("summary", {}).get(key)
                cells.append("—" if v is None else fmt.format(v * scale))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append(targets(results))
    for n in levels:
        engine = {name: by_level[n]["engine"] for name, by_level in results.items() if by_level.get(n, {}).get("engine")}
        if engine:
            out += [f"\n### Inside the fleets at {n} client{'s' if n > 1 else ''}\n", engine_table(engine, {})]
    out += ["", ENGINE_NOTE]
    return "\n".join(out)


def sweep_plots(results: dict[str, dict[int, Any]], levels: list[int], out: Path, name: str) -> list[tuple[str, Path | None]]:
    """tok/s and TTFT against clients, and the response-time CDF at the highest level."""
    def series(key: str, scale: float) -> dict[str, dict[int, float]]:
        return {system: {n: r["summary"][key] * scale for n, r in by_level.items() if r["summary"].get(key) is not None}
                for system, by_level in results.items()}

    top = max(levels)
    cdf = {system: [s["total_s"] for s in by_level[top]["samples"] if s["ok"]]
           for system, by_level in results.items() if top in by_level}
    return [
        ("aggregate tok/s against clients", plots.against_concurrency(
            series("tok_per_s", 1.0), out / f"{name}_throughput.png", title="Throughput", ylabel="aggregate tok/s")),
        ("TTFT p50 against clients", plots.against_concurrency(
            series("ttft_p50_s", 1000.0), out / f"{name}_ttft_p50.png", title="TTFT p50", ylabel="TTFT p50 (ms)")),
        ("TTFT p99 against clients", plots.against_concurrency(
            series("ttft_p99_s", 1000.0), out / f"{name}_ttft_p99.png", title="TTFT p99", ylabel="TTFT p99 (ms)")),
        (f"response time CDF at {top} clients", plots.latency_cdf(
            cdf, out / f"{name}_latency_cdf.png", title=f"Response time CDF, {top} clients")),
    ]


def targets(results: dict[str, dict[int, Any]], level: int = 16) -> str:
    """The issue's three targets at ``level`` clients, per policy."""
    server = results.get("mlx_lm.server", {}).get(level, {}).get("summary")
    lines = [f"\n### Targets at {level} clients\n", "| policy | ×own 1-client (≥5) | ×mlx_lm.server tok/s (≥1.25) | TTFT p99 vs server (≤1) |",
             "|---|---|---|---|"]
    for name, by_level in results.items():
        if name == "mlx_lm.server" or level not in by_level or 1 not in by_level:
            continue
        s, one = by_level[level]["summary"], by_level[1]["summary"]
        scale = s["tok_per_s"] / one["tok_per_s"] if one["tok_per_s"] else float("nan")
        vs = s["tok_per_s"] / server["tok_per_s"] if server and server["tok_per_s"] else float("nan")
        p99 = s["ttft_p99_s"] / server["ttft_p99_s"] if server and server["ttft_p99_s"] else float("nan")
        lines.append(f"| {name} | {scale:.2f} | {vs:.2f} | {p99:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
