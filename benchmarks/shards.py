"""One replica sharded over two ranks against the same model unsharded, at 1 and 8 clients, side by side.

Both fleets stay up for the whole run, and their load runs alternate (unsharded, sharded,
sharded, unsharded, ...) so drift in the shared machine's load falls on both. Every prompt
carries a unique tag and opts out of the prompt cache. Besides tok/s and TTFT, the report
gives each process's resident memory: what sharding is for.

    python -m benchmarks.shards [--model demo-small] [--clients 1,8] [--requests 32] [--repeats 3]
    python -m benchmarks.shards --quick      # a smoke run (writes shards_quick.*): one short round each
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from workers.blas import find_blas, preload_blas

preload_blas(find_blas("auto"))  # this process loads no model, but keep the workers' env identical

from actors.config import BatchingConfig  # noqa: E402
from benchmarks.common import RESULTS_DIR, Report, environment, progress, ratio  # noqa: E402
from benchmarks.load import fleet_requester, run_load  # noqa: E402
from benchmarks.overhead import local_config  # noqa: E402
from benchmarks.replicas import prompts_for, summarize  # noqa: E402
from benchmarks.soak import rss_kib  # noqa: E402
from mlx_fleet.client import Client  # noqa: E402
from mlx_fleet.embedded import BackgroundFleet  # noqa: E402

SHARDS = (1, 2)


def worker_row(frontend: str, model: str) -> dict[str, Any]:
    """The status row of the model's one replica."""
    with Client(frontend, timeout_s=30) as client:
        return client.status()["models"][model]["workers"][0]


def rank_memory(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Resident memory of each process of a replica (its ranks, or the one worker)."""
    ranks = row.get("ranks") or [{"rank": 0, "pid": row["pid"]}]
    return [{"rank": r["rank"], "pid": r["pid"], "rss_mib": round((rss_kib(r["pid"]) or 0) / 1024, 1)} for r in ranks]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both configurations at each client count and write benchmarks/results/<name>.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--clients", default="1,8", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=32, help="requests per load run")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="load runs per configuration and client count, alternating")
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): 1 repeat of 8 requests x 8 tokens")
    ap.add_argument("--name", default="shards")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("MLX_FLEET_BENCH_OUT") or RESULTS_DIR),
                    help="folder for the JSON and Markdown (default: $MLX_FLEET_BENCH_OUT or benchmarks/results)")
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c]
    if args.quick:
        args.requests, args.max_tokens, args.repeats, args.name = 8, 8, 1, args.name + "_quick"

    fleets = {}
    for n in SHARDS:
        cfg, ipc_dir = local_config(args.model, BatchingConfig())
        cfg = dataclasses.replace(cfg, models=tuple(dataclasses.replace(m, shards=n) for m in cfg.models))
        fleets[n] = BackgroundFleet(cfg, ipc_dir)
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {(n, c): [] for n in SHARDS for c in clients}
    memory: dict[int, list[dict[str, Any]]] = {}
    info: dict[str, Any] = {}
    try:
        for n, fleet in fleets.items():
            progress(f"shards: starting {args.model} with shards={n}")
            fleet.start()
            run_load(fleet_requester(fleet.cfg.frontend, args.model, 4, cache=False), 2, prompts_for(f"warm{n}", 2))
        for r in range(args.repeats):
            for c in clients:
                for n in (SHARDS if r % 2 == 0 else tuple(reversed(SHARDS))):
                    load = run_load(fleet_requester(fleets[n].cfg.frontend, args.model, args.max_tokens, cache=False),
                                    c, prompts_for(f"r{r}c{c}x{n}", args.requests))
                    runs[(n, c)].append(load.summary())
                    progress(f"shards: round {r + 1}/{args.repeats}, {c} client(s), shards={n}: "
                             f"{runs[(n, c)][-1]['tok_per_s']:.1f} tok/s, TTFT p50 {runs[(n, c)][-1]['ttft_p50_s']:.3f}s")
        for n, fleet in fleets.items():
            row = worker_row(fleet.cfg.frontend, args.model)
            memory[n] = rank_memory(row)
            info[str(n)] = {k: row["info"].get(k) for k in ("blas", "precision", "shards", "shard_mode")}
            info[str(n)]["shard_checked_steps"] = row.get("stats", {}).get("shard_checked_steps")
    finally:
        for fleet in fleets.values():
            fleet.stop()

    results: dict[str, Any] = {"memory": {str(n): memory.get(n, []) for n in SHARDS}, "workers": info}
    for c in clients:
        one, two = summarize(runs[(1, c)]), summarize(runs[(2, c)])
        results[f"clients_{c}"] = {"1": one, "2": two, "ratio_2_over_1": {
            "tok_per_s": ratio(two["tok_per_s"]["mean"], one["tok_per_s"]["mean"]),
            "ttft_p50_s": ratio(two["ttft_p50_s"]["mean"], one["ttft_p50_s"]["mean"])}}
    blas = (info.get("1") or {}).get("blas") or {}
    report = Report(args.name, f"{args.model}: one replica sharded over 2 ranks against unsharded",
                    environment(blas, args.model),
                    {"clients": clients, "requests": args.requests, "max_tokens": args.max_tokens,
                     "repeats": args.repeats, "quick": args.quick})
    report.results = results
    report.add_markdown(markdown(results, clients, args))
    report.publish(args.out)
    return results


def markdown(results: dict[str, Any], clients: list[int], args: argparse.Namespace) -> str:
    """The side-by-side table, the memory per process, and what the figures mean."""
    lines = [f"Closed-loop clients, {args.requests} requests of {args.max_tokens} tokens per run, {args.repeats} "
             "run(s) per configuration and client count, alternating; prompt cache off.\n",
             "| clients | shards | tok/s (mean) | tok/s range | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for c in clients:
        for n in SHARDS:
            r = results[f"clients_{c}"][str(n)]
            tps, p50, p99, itl = r["tok_per_s"], r["ttft_p50_s"], r["ttft_p99_s"], r["itl_p50_s"]
            itl_ms = f"{itl['mean'] * 1000:.1f}" if itl else "-"
            lines.append(f"| {c} | {n} | {tps['mean']:.1f} | {tps['min']:.1f}-{tps['max']:.1f} | {p50['mean']:.3f} | "
                         f"{p99['mean']:.3f} | {itl_ms} | {r['success_rate']:.0%} |")
    for c in clients:
        q = results[f"clients_{c}"]["ratio_2_over_1"]
        lines.append(f"\n{c} client(s), sharded x2 vs unsharded: tok/s x{q['tok_per_s']:.2f}, "
                     f"TTFT p50 x{q['ttft_p50_s']:.2f}.")
    lines += ["", "Resident memory per process after the runs (MiB):", "",
              "| shards | " + " | ".join(f"rank {i}" for i in range(max(SHARDS))) + " |",
              "|---|" + "---|" * max(SHARDS)]
    for n in SHARDS:
        cells = [f"{m['rss_mib']:.1f}" for m in results["memory"][str(n)]]
        lines.append(f"| {n} | " + " | ".join(cells + ["-"] * (max(SHARDS) - len(cells))) + " |")
    checked = (results["workers"].get("2") or {}).get("shard_checked_steps")
    lines.append(f"\nSteps the follower confirmed token for token (from the last heartbeat): {checked}.")
    lines.append(
        "\nThe point of sharding here is correctness and memory, not speed. Two ranks on this two-core machine "
        "share the same cores and the same memory bandwidth: each decode step reads half the weights per rank "
        "but adds two all_sum collectives per layer over loopback TCP, and rank 0 also sends every engine "
        "operation to its follower. Sharding is for a model whose weights do not fit one machine; each rank "
        "then holds its share of them (the embeddings and the output head stay whole on every rank, so the "
        "share of a small model is more than half). Where a model fits, replicas (`--replicas`) add throughput "
        "and sharding does not.")
    if args.quick:
        lines.append("\n_Quick smoke run: one short round each; the figures are not representative._")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
