"""The seed's 50-question comparison, reproduced honestly, sequentially and under concurrency.

The seed (kr-serve-mlx v1.4.2) reported 50 sequential questions of 50 tokens for its
batching-window steps against a bare engine. With one sequential client the queue is
never deeper than 1, so its window policies never engaged; this run adds an 8-client
variant, where they can. Configurations, side by side in one run, all up at once:

- ``bare``: mlx-lm in this process, no transport: ``stream_generate`` one request at a
  time (1 client); ``BatchGenerator`` with 8 sequences in flight (8 clients).
- ``v1.4.1``: our fleet, fixed window 2.0 ms, no fast path (the seed's v1.4.1);
  ``window-1.0``; ``fast-path`` (the fleet's default); ``adaptive``; ``auto-tune``.
- ``mlx_lm.server`` on the same model folder, with the same BLAS.

Every configuration runs ``--repeats`` times, interleaved: each repeat runs every
configuration once, in an order rotated by one per repeat. Prompts carry a tag unique
per repeat and variant, so no prompt cache (ours or mlx_lm.server's) serves a prompt it
saw before, and the 50 questions stay readable. Every system gets the same prompts.

    python -m benchmarks seed [--model demo-small] [--questions 50] [--repeats 3] [--clients 8]
    python -m benchmarks seed --quick     # smoke run: demo, 4 questions, 1 repeat, 8 tokens
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

from workers.blas import blas_env, describe_blas, find_blas, preload_blas

BLAS = preload_blas(find_blas("auto"))  # before anything imports mlx

from actors.config import BatchingConfig, ModelSpec, fixed_capacity  # noqa: E402
from benchmarks import plots, tables  # noqa: E402
from benchmarks.common import Report, add_out_argument, environment, progress, served_name  # noqa: E402
from benchmarks.fleet_probe import ENGINE_NOTE, FleetProbe, engine_table, merge  # noqa: E402
from benchmarks.load import LoadRun, MlxLmServer, fleet_requester, http_requester, run_direct, run_load  # noqa: E402
from benchmarks.overhead import local_config  # noqa: E402
from benchmarks.seed_runs import Plan, RunFn, System, measure  # noqa: E402
from mlx_fleet.client import Client  # noqa: E402
from mlx_fleet.embedded import BackgroundFleet  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """One column of the seed's comparison: a fleet (``batching`` set) or a peer."""

    key: str
    label: str
    batching: BatchingConfig | None = None


BARE, SERVER, SEED_V141, DEFAULT = "bare", "mlx_lm.server", "v1.4.1", "fast-path"
CONFIGS: tuple[Config, ...] = (
    Config(BARE, "mlx-lm in-process (bare engine)"),
    Config(SEED_V141, "fleet: window 2.0 ms, no fast path (seed v1.4.1)",
           BatchingConfig(policy="fixed", window_ms=2.0, fast_path=False)),
    Config("window-1.0", "fleet: window 1.0 ms", BatchingConfig(policy="fixed", window_ms=1.0, fast_path=False)),
    Config(DEFAULT, "fleet: + fast path (default)", BatchingConfig(policy="fixed", window_ms=1.0, fast_path=True)),
    Config("adaptive", "fleet: + adaptive window", BatchingConfig(policy="adaptive", fast_path=True)),
    Config("auto-tune", "fleet: + auto-tune", BatchingConfig(policy="adaptive", fast_path=True, auto_tune=True)),
    Config(SERVER, "mlx_lm.server"),
)
QUICK = {"model": "demo", "questions": 4, "repeats": 1, "max_tokens": 8, "clients": 4, "warmup": 1, "name": "seed_quick"}
NO_GPU_NOTE = ("This run was not on a GPU. `benchmarks/gpu_check.sh` is the prepared GPU run (`mlx[cuda]`, a "
               "random-weight model of Llama-3.2-3B's configuration, the seed's model); see benchmarks/README.md. "
               "For scale: the seed reported about 405 ms per 50-token response and about 94 ms TTFT on Apple silicon.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options; ``--quick`` changes the defaults, and explicit options still win."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo-small", help="a demo size or an MLX model folder")
    ap.add_argument("--questions", type=int, default=50, help="how many of the 50 questions")
    ap.add_argument("--max-tokens", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8, help="clients of the concurrent variant")
    ap.add_argument("--variants", default="sequential,concurrent")
    ap.add_argument("--configs", default=",".join(c.key for c in CONFIGS), help="subset, comma-separated")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests per system and variant")
    ap.add_argument("--order", choices=("back-to-back", "alternating"), default="back-to-back",
                    help="sequential variant: each system answers all questions in turn (the seed's way), or "
                         "question by question every system in turn")
    ap.add_argument("--client", choices=("thread", "direct"), default="thread",
                    help="sequential variant: the fleet's one client runs in a client thread (as under load) or "
                         "in the benchmark's main thread (as benchmarks/overhead.py does)")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="stop starting runs that would end later than this many seconds after the start; the "
                         "report says what was left out (0: no deadline)")
    ap.add_argument("--name", default="seed")
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): " + str(QUICK))
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    unknown = set(args.configs.split(",")) - {c.key for c in CONFIGS}
    if unknown:
        ap.error(f"unknown configurations {sorted(unknown)}; known: {[c.key for c in CONFIGS]}")
    return args


def start_systems(stack: contextlib.ExitStack, configs: list[Config], args: argparse.Namespace,
                  model_path: str) -> dict[str, System]:
    """Start every configuration and keep it up for the whole run; one runner each."""
    systems: dict[str, System] = {}
    name = served_name(args.model)
    for c in configs:
        if c.key == BARE:
            systems[c.key] = System(c.key, _bare_runner(stack, model_path, args.max_tokens))
        elif c.key == SERVER:
            b = BatchingConfig()
            fixed = fixed_capacity(b)  # "auto": mlx_lm.server keeps its own default decode concurrency
            server = stack.enter_context(MlxLmServer(model_path, env=blas_env(BLAS), extra_args=[
                *(["--decode-concurrency", str(fixed)] if fixed else []), "--prompt-concurrency", str(b.admission_batch)]))
            systems[c.key] = System(c.key, _closed_loop(http_requester(server.port, model_path, args.max_tokens)))
        else:
            assert c.batching is not None
            cfg, ipc_dir = local_config(name, c.batching, models=(ModelSpec(name, model_path, 1, c.batching),))
            stack.enter_context(BackgroundFleet(cfg, ipc_dir))
            make = fleet_requester(cfg.frontend, name, args.max_tokens)
            probe = FleetProbe(stack.enter_context(Client(cfg.frontend, timeout_s=30)), name)
            systems[c.key] = System(c.key, _closed_loop(make, direct=args.client == "direct"), probe)
        progress(f"seed: up: {c.label}")
    return systems


def _bare_runner(stack: contextlib.ExitStack, model_path: str, max_tokens: int) -> RunFn:
    """mlx-lm in this process: stream_generate for 1 client, a kept BatchGenerator for more."""
    from mlx_lm import load

    from benchmarks.bare import make_batch_generator, run_batched, run_sequential

    model, tokenizer = load(model_path)
    gens: dict[int, Any] = {}  # one generator per client count, kept like a server keeps its own
    stack.callback(lambda: [g.close() for g in gens.values()])

    def bare(prompts: list[str], clients: int) -> LoadRun:
        if clients == 1:
            return run_sequential(model, tokenizer, prompts, max_tokens)
        if clients not in gens:
            gens[clients] = make_batch_generator(model, tokenizer, clients)
        return run_batched(model, tokenizer, prompts, max_tokens, clients, gen=gens[clients])

    return bare


def _closed_loop(make_requester: Any, *, direct: bool = False) -> RunFn:
    def run(prompts: list[str], clients: int) -> LoadRun:
        if direct and clients == 1:
            return run_direct(make_requester, prompts)
        return run_load(make_requester, clients, prompts)

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and write ``<out>/<name>.{json,md}`` (after every run) and its CDF plots."""
    args = parse_args(argv)
    from workers.models.sources import resolve_source

    t0 = time.monotonic()
    wanted = set(args.configs.split(","))
    configs = [c for c in CONFIGS if c.key in wanted]
    labels = {c.key: c.label for c in configs}
    model_path = str(resolve_source(args.model))
    plan = Plan({v: (1 if v == "sequential" else args.clients) for v in args.variants.split(",")}, args.repeats,
                args.questions, args.warmup, args.order, t0 + args.deadline_s if args.deadline_s > 0 else None)
    with contextlib.ExitStack() as stack:
        systems = start_systems(stack, configs, args, model_path)
        env = environment(describe_blas(), f"{args.model} ({model_path})")  # MLX is imported by now
        report = Report(args.name, "The seed's comparison: 50 questions, bare engine, fleet steps, mlx_lm.server", env,
                        {"questions": args.questions, "max_tokens": args.max_tokens, "repeats": args.repeats,
                         "clients": args.clients, "warmup": args.warmup, "configs": [c.key for c in configs],
                         "order": args.order, "client": args.client, "deadline_s": args.deadline_s,
                         "quick": args.quick})

        def write(data: dict[str, Any], pngs: dict[str, list[tuple[str, Path | None]]] | None = None) -> tuple[Path, Path]:
            report.results = {"labels": labels, "wall_s": time.monotonic() - t0, **data,
                              "gpu_note": None if _on_gpu(env) else NO_GPU_NOTE}
            report.sections = []
            report.add_markdown(markdown(data, labels, args, env, pngs or {}))
            return report.write(args.out)

        data = measure(systems, plan, on_progress=write)
    json_path, md_path = write(data, seed_plots(data, labels, args.out, args.name))
    progress(f"wrote {json_path} and {md_path} in {time.monotonic() - t0:.0f} s")
    print(md_path.read_text())
    return report.results


def _on_gpu(env: dict[str, Any]) -> bool:
    return "gpu" in str(env.get("mlx_device") or "").lower()


def seed_plots(data: dict[str, Any], labels: dict[str, str], out: Path, name: str) -> dict[str, list[tuple[str, Path | None]]]:
    """Response-time and TTFT CDFs per variant (all repeats pooled), next to the report."""
    made: dict[str, list[tuple[str, Path | None]]] = {}
    for variant, clients in data["variants"].items():
        made[variant] = []
        for metric, field, title in (("latency", "total_s", "response time"), ("ttft", "ttft_s", "TTFT")):
            series = {labels[k]: [s[field] for run in runs for s in run if s["ok"]]
                      for k, runs in data["samples"][variant].items()}
            caption = f"{title} CDF, {variant} ({clients} client{'s' if clients > 1 else ''})"
            made[variant].append((caption, plots.latency_cdf(series, out / f"{name}_{variant}_{metric}_cdf.png",
                                                             title=caption, xlabel=f"{title} (ms)")))
    return made


def markdown(data: dict[str, Any], labels: dict[str, str], args: argparse.Namespace, env: dict[str, Any],
             pngs: dict[str, list[tuple[str, Path | None]]]) -> str:
    """The seed's tables per variant, the comparisons, the headline, the plots."""
    out = [f"{args.questions} fixed questions (`benchmarks/questions.txt`), {args.max_tokens} tokens each, greedy, "
           f"on `{args.model}`. Every configuration ran {args.repeats} time(s), interleaved (each repeat runs every "
           "configuration once, order rotated per repeat); all systems stayed up for the whole run. "
           "Each cell is the mean over repeats `±` the relative half-range across repeats (the noise). "
           "A comparison is *within noise* when the per-repeat ranges of the two configurations overlap. "
           "Response time and TTFT are measured at the client; tok/s is completion tokens over the run's wall time.",
           "", f"**GPU.** Ran on MLX device `{env.get('mlx_device')}`." if _on_gpu(env) else f"**GPU.** {NO_GPU_NOTE}"]
    if args.quick:
        out.append("\n**Quick smoke run: not a result.**")
    out.append(f"\nSystems alive: {', '.join(f'`{k}`' for k in labels)}. Sequential order: {data['order']}; the "
               f"fleet's sequential client ran {'in the main thread' if args.client == 'direct' else 'in a client thread'}.")
    if data["skipped"]:
        out.append(f"\n**Partial: the deadline ({args.deadline_s:g} s) left out {len(data['skipped'])} of "
                   f"{data['planned']} runs:** " + ", ".join(f"{s['variant']} {s['config']} (repeat {s['repeat']})"
                                                            for s in data["skipped"]) + ".")
    out.append(headline(data, labels))
    for variant, clients in data["variants"].items():
        res = {k: v for k, v in data["metrics"][variant].items() if v}
        engine = {k: merge([e for e in runs if e]) for k, runs in data["engine"][variant].items()}
        out += [f"\n## {variant.capitalize()} ({clients} client{'s' if clients > 1 else ''})",
                "\n### Response time, throughput, success (the seed's table)\n", tables.metrics_table(res, labels),
                "\n### Time to first token\n", tables.metrics_table(res, labels, tables.TTFT_COLUMNS),
                "\n### Overhead against the bare engine\n", tables.comparison_table(res, labels, BARE),
                "\n### Against mlx_lm.server\n", tables.comparison_table(res, labels, SERVER),
                "\n### Against the seed's v1.4.1 configuration\n", tables.comparison_table(res, labels, SEED_V141),
                "\n### Inside the engines: paths, step time, CPU (all repeats)\n", engine_table(engine, labels),
                "", ENGINE_NOTE, "", plots.plot_links(pngs.get(variant, []))]
    return "\n".join(out)


def headline(data: dict[str, Any], labels: dict[str, str]) -> str:
    """The fleet's default configuration against the bare engine and mlx_lm.server, in words."""
    lines = ["\n## Headline\n"]
    for variant, clients in data["variants"].items():
        res = {k: v for k, v in data["metrics"][variant].items() if v}
        if DEFAULT not in res:
            continue
        for other in (BARE, SERVER):
            if other not in res:
                continue
            parts = []
            for metric, label in (("response_mean_s", "mean response"), ("ttft_mean_s", "TTFT mean"), ("tok_per_s", "tok/s")):
                c = tables.compare(res[DEFAULT], res[other], metric)
                parts.append(f"{label} {c['change_pct']:+.1f}% ({c['verdict']})")
            c = tables.compare(res[DEFAULT], res[other], "ttft_median_s")
            parts.append(f"TTFT p50 {(c['value'] - c['baseline']) * 1000:+.1f} ms ({c['verdict']})")
            lines.append(f"- {variant}, {clients} client(s): {labels[DEFAULT]} vs {labels[other]}: " + "; ".join(parts) + ".")
    return "\n".join(lines) if len(lines) > 1 else ""


if __name__ == "__main__":
    main()
