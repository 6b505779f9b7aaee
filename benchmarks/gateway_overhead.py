"""The HTTP gateway's overhead: the OpenAI gateway vs the direct ZeroMQ client vs mlx_lm.server.

One run, one model, one BLAS, three ways in:

- ``zmq``: ``mlx_fleet.AsyncClient`` straight to the broker (the fleet's native path);
- ``gateway``: streamed ``POST /v1/completions`` to the fleet's HTTP gateway (same fleet);
- ``mlx_lm.server``: the same HTTP requests to ``python -m mlx_lm.server`` on the same folder.

All three stay up for the whole run. Each repeat runs every level on every target, in an
order that rotates, so drift in the shared machine's load spreads over all of them. Each
request's prompt carries a tag unique to its target, repeat and level, so that no target
gets prompt-cache hits from another's requests. The gateway's overhead against the ZeroMQ
client (and against mlx_lm.server) is reported in ms and % at TTFT p50/p99 (pooled over
repeats) and in aggregate tok/s, with a flag saying whether the per-repeat ranges overlap.

    python -m benchmarks.gateway_overhead [--model demo-small] [--levels 1,16] [--repeats 3]
    python -m benchmarks.gateway_overhead --quick    # smoke run; writes gateway_overhead_quick.*
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any, Callable

from actors.config import BatchingConfig
from benchmarks.common import Report, environment, progress, questions, spread, within_noise
from benchmarks.load import LoadRun, MlxLmServer, Requester, RequestSample, TokenTimer, free_port, http_requester, run_load
from benchmarks.overhead import local_config
from mlx_fleet.client import AsyncClient
from mlx_fleet.embedded import BackgroundFleet
from workers.blas import blas_env, find_blas

TARGETS = ("zmq", "gateway", "mlx_lm.server")
BASELINES = (("zmq", "the direct ZeroMQ client (AsyncClient)"), ("mlx_lm.server", "mlx_lm.server"))


def async_fleet_requester(frontend: str, model: str, max_tokens: int) -> Callable[[], tuple[Requester, Callable[[], None]]]:
    """A factory of per-thread requesters over :class:`AsyncClient`, each on its own event loop."""

    def make() -> tuple[Requester, Callable[[], None]]:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def open_client() -> AsyncClient:
            return AsyncClient(frontend, timeout_s=300.0)

        client = loop.run_until_complete(open_client())

        async def one(prompt: str) -> RequestSample:
            timer, tokens = TokenTimer(), 0
            stream = client.stream(prompt, model=model, max_tokens=max_tokens, temperature=0.0)
            async for chunk in stream:
                if chunk.text:
                    timer.token()
            assert stream.completion is not None
            tokens = int(stream.completion.usage.get("completion_tokens", 0))
            return timer.sample(tokens)

        def close() -> None:
            loop.run_until_complete(client.close())
            loop.close()

        return (lambda prompt: loop.run_until_complete(one(prompt))), close

    return make


def tagged_prompts(tag: str, count: int) -> list[str]:
    """``count`` of the fixed questions, each prefixed with a tag of fixed width (no cache hits)."""
    qs = questions()
    return [f"({tag}.{i:03d}) {qs[i % len(qs)]}" for i in range(count)]


def _delta(new: float | None, base: float | None) -> dict[str, float | None]:
    if new is None or base is None:
        return {"ms": None, "pct": None}
    return {"ms": (new - base) * 1000.0, "pct": (new - base) / base * 100.0 if base else None}


def compare(runs: dict[str, dict[int, list[LoadRun]]], target: str, base: str, levels: list[int]) -> dict[int, Any]:
    """``target`` against ``base`` per level: TTFT p50/p99 deltas, tok/s delta, noise flags."""
    out: dict[int, Any] = {}
    for level in levels:
        t, b = pooled(runs[target][level]).summary(), pooled(runs[base][level]).summary()
        t_tok = [r.summary()["tok_per_s"] for r in runs[target][level]]
        b_tok = [r.summary()["tok_per_s"] for r in runs[base][level]]
        t_p50 = [r.summary()["ttft_p50_s"] or 0.0 for r in runs[target][level]]
        b_p50 = [r.summary()["ttft_p50_s"] or 0.0 for r in runs[base][level]]
        out[level] = {
            "ttft_p50": _delta(t["ttft_p50_s"], b["ttft_p50_s"]),
            "ttft_p99": _delta(t["ttft_p99_s"], b["ttft_p99_s"]),
            "tok_per_s_pct": (t["tok_per_s"] - b["tok_per_s"]) / b["tok_per_s"] * 100.0 if b["tok_per_s"] else None,
            "ttft_p50_within_noise": within_noise(t_p50, b_p50),
            "tok_per_s_within_noise": within_noise(t_tok, b_tok),
        }
    return out


def pooled(runs: list[LoadRun]) -> LoadRun:
    """The repeats of one level as one run: all samples, summed wall time."""
    return LoadRun(runs[0].clients, sum(r.wall_s for r in runs), [s for r in runs for s in r.samples])


def markdown(runs: dict[str, dict[int, list[LoadRun]]], overhead: dict[str, Any], levels: list[int]) -> str:
    """A table of every target, then the gateway's overhead against each baseline."""
    out = ["| target | clients | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | tok/s | tok/s per repeat (spread) | ok |",
           "|---|---:|---:|---:|---:|---:|---|---:|"]
    for level in levels:
        for name in runs:
            s = pooled(runs[name][level]).summary()
            per_rep = spread([r.summary()["tok_per_s"] for r in runs[name][level]])
            ms = {k: "—" if s[k] is None else f"{s[k] * 1000:.1f}" for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s")}
            out.append(f"| {name} | {level} | {ms['ttft_p50_s']} | {ms['ttft_p99_s']} | {ms['itl_p50_s']} | "
                       f"{s['tok_per_s']:.1f} | {per_rep['min']:.1f}–{per_rep['max']:.1f} (±{per_rep['half_range_pct']:.0f}%) | "
                       f"{s['ok']}/{s['requests']} |")
    for base, title in BASELINES:
        if base not in overhead:
            continue
        out += ["", f"### Gateway vs {title}", "",
                "Positive TTFT: the gateway is slower. Negative tok/s: the gateway is slower. "
                "'noise': the per-repeat ranges overlap.", "",
                "| clients | TTFT p50 | TTFT p99 | aggregate tok/s |", "|---:|---:|---:|---:|"]
        for level, o in overhead[base].items():
            def cell(d: dict[str, float | None]) -> str:
                return "—" if d["ms"] is None else f"{d['ms']:+.2f} ms ({d['pct']:+.1f}%)"
            tok = "—" if o["tok_per_s_pct"] is None else f"{o['tok_per_s_pct']:+.1f}%"
            out.append(f"| {level} | {cell(o['ttft_p50'])}{' (noise)' if o['ttft_p50_within_noise'] else ''} | "
                       f"{cell(o['ttft_p99'])} | {tok}{' (noise)' if o['tok_per_s_within_noise'] else ''} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and write benchmarks/results/<name>.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-small", help="a built-in demo size or an MLX model folder")
    ap.add_argument("--levels", default="1,16", help="client counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-client", type=int, default=4, help="requests per client at each level and repeat")
    ap.add_argument("--min-requests", type=int, default=16, help="requests at least, per level and repeat")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-server", action="store_true", help="skip mlx_lm.server")
    ap.add_argument("--quick", action="store_true", help="smoke run in well under a minute; writes <name>_quick.*")
    ap.add_argument("--name", default="gateway_overhead")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.per_client, args.min_requests, args.max_tokens = 1, 1, 2, 8
        args.name += "_quick"
    levels = [int(x) for x in args.levels.split(",")]
    capacity = max(levels)

    from workers.models.sources import resolve_source

    blas = find_blas("auto")
    model_path = str(resolve_source(args.model))
    cfg, ipc_dir = local_config(args.model, BatchingConfig(decode_capacity=capacity), http_port=free_port(),
                                log_level="WARNING")
    runs: dict[str, dict[int, list[LoadRun]]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(BackgroundFleet(cfg, ipc_dir))
        systems = {"zmq": async_fleet_requester(cfg.frontend, args.model, args.max_tokens),
                   "gateway": http_requester(cfg.http_port, args.model, args.max_tokens)}
        progress(f"fleet up; gateway on :{cfg.http_port}")
        if not args.no_server:
            server = stack.enter_context(MlxLmServer(model_path, env=blas_env(blas),
                                                     extra_args=["--decode-concurrency", str(capacity)]))
            systems["mlx_lm.server"] = http_requester(server.port, "default_model", args.max_tokens)
            progress("mlx_lm.server up")
        names = list(systems)
        for i, name in enumerate(names):  # warm-up: compile paths, connections
            run_load(systems[name], 2, tagged_prompts(f"w{i}", 4))
        for rep in range(args.repeats):
            for li, level in enumerate(levels):
                turn = (rep + li) % len(names)
                for name in names[turn:] + names[:turn]:
                    count = max(level * args.per_client, args.min_requests)
                    run = run_load(systems[name], level, tagged_prompts(f"t{names.index(name)}r{rep}l{level:02d}", count))
                    runs.setdefault(name, {}).setdefault(level, []).append(run)
                    s = run.summary()
                    progress(f"repeat {rep + 1}/{args.repeats} {name} @ {level} clients: {s['tok_per_s']:.1f} tok/s, "
                             f"TTFT p50 {1000 * (s['ttft_p50_s'] or 0):.1f} ms, ok {s['ok']}/{s['requests']}")
    overhead = {base: compare(runs, "gateway", base, levels) for base, _ in BASELINES if base in runs}
    report = Report(args.name, "HTTP gateway overhead: gateway vs direct ZeroMQ client vs mlx_lm.server",
                    environment({"name": blas.name, "path": blas.path}, args.model),
                    {"levels": levels, "repeats": args.repeats, "per_client": args.per_client, "min_requests": args.min_requests,
                     "max_tokens": args.max_tokens, "decode_capacity": capacity, "quick": args.quick})
    report.env["packages"]["aiohttp"] = _version("aiohttp")
    report.results = {
        "summary": {name: {level: pooled(r).summary() for level, r in by_level.items()} for name, by_level in runs.items()},
        "overhead": overhead,
        "samples": {name: {level: [[s.__dict__ for s in r.samples] for r in rs] for level, rs in by_level.items()}
                    for name, by_level in runs.items()},
    }
    report.add_markdown(markdown(runs, overhead, levels))
    report.publish()
    return report.results


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
