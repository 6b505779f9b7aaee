"""prefill_step_size (or prefill_first_tokens): throughput, time to first token and decoding stalls.

A prompt is prefilled ``prefill_step_size`` tokens per engine step. Larger chunks make
fewer, larger matrix products (faster prefill, sooner first token for long prompts);
smaller ones interleave with decoding, so streams already running stall less behind a
long prompt. Liveness does not depend on it: the worker's I/O thread heartbeats during
any step. One fleet per setting, all up for the whole run; each phase runs on every
setting in turn, so the shared machine's drift spreads over all of them.

- ``alone``: long prompts one at a time: TTFT is prefill speed.
- ``mixed``: ``--clients`` clients, every ``--long-every``-th prompt long, the rest short:
  aggregate tok/s, TTFT of short and long prompts, and inter-token latency p99
  (how long decoding streams wait behind a prefill chunk).

``--setting prefill_first_tokens --sizes 0,2048`` compares how long decoding pauses for
waiting prompts instead (0: never, as mlx-lm's ``BatchGenerator``), on the same phases.

    python -m benchmarks prefill-step [--model demo-small] [--sizes 128,256,512] [--quick] [--out DIR]
    python -m benchmarks prefill-step --setting prefill_first_tokens --sizes 0,2048 --name prefill_first
"""

from __future__ import annotations

import argparse
import contextlib
import threading
from typing import Any, Callable

from workers.blas import describe_blas, find_blas, preload_blas

preload_blas(find_blas("auto"))  # before anything imports mlx

from actors.config import BatchingConfig  # noqa: E402
from actors.stats import percentile  # noqa: E402
from benchmarks.common import Report, add_out_argument, environment, progress, questions  # noqa: E402
from benchmarks.load import Requester, RequestSample, fleet_requester, run_load  # noqa: E402
from benchmarks.overhead import local_config  # noqa: E402
from mlx_fleet.embedded import BackgroundFleet  # noqa: E402

Factory = Callable[[], tuple[Requester, Callable[[], None]]]


def long_prompt(tag: str, words: int) -> str:
    """A prompt of about ``words`` words, unique from its first characters (no prompt-cache reuse)."""
    qs = questions()
    text: list[str] = [f"({tag})"]
    i = 0
    while sum(len(q.split()) for q in text) < words:
        text.append(qs[i % len(qs)])
        i += 1
    return " ".join(text) + " Answer the last question."


def recording(make: Factory, kinds: dict[str, str], out: dict[str, list[RequestSample]]) -> Factory:
    """The same requesters, filing each sample under its prompt's kind (short or long)."""
    lock = threading.Lock()

    def wrapped() -> tuple[Requester, Callable[[], None]]:
        send, close = make()

        def timed(prompt: str) -> RequestSample:
            sample = send(prompt)
            with lock:
                out.setdefault(kinds[prompt], []).append(sample)
            return sample

        return timed, close

    return wrapped


def p(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def phase(make: Factory, clients: int, prompts: dict[str, str]) -> dict[str, Any]:
    """Run ``prompts`` (text -> kind) from ``clients`` threads; figures per kind and overall."""
    by_kind: dict[str, list[RequestSample]] = {}
    run = run_load(recording(make, prompts, by_kind), clients, list(prompts))
    out: dict[str, Any] = {"summary": run.summary()}
    for kind, samples in by_kind.items():
        ok = [s for s in samples if s.ok]
        ttft = [s.ttft_s for s in ok]
        out[kind] = {"n": len(samples), "ok": len(ok), "ttft_p50_s": p(ttft, 50), "ttft_p99_s": p(ttft, 99)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both phases on each setting and write ``prefill_step.{json,md}``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--setting", default="prefill_step_size", choices=("prefill_step_size", "prefill_first_tokens"),
                    help="the batching setting compared")
    ap.add_argument("--sizes", default="128,256,512", help="values of that setting to compare")
    ap.add_argument("--long-words", type=int, default=600, help="words in a long prompt (about 1.5 tokens each on the demo models)")
    ap.add_argument("--alone", type=int, default=5, help="long prompts sent one at a time")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48, help="requests in the mixed phase")
    ap.add_argument("--long-every", type=int, default=4, help="every N-th mixed request is long")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of both phases over every setting")
    ap.add_argument("--name", default="prefill_step")
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): demo, small prompts, few requests")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.long_words, args.alone, args.clients, args.requests = "demo", 150, 1, 2, 4
        args.max_tokens, args.repeats, args.name = 8, 1, args.name + "_quick"
    sizes = [int(x) for x in args.sizes.split(",")]
    results: dict[int, dict[str, list[Any]]] = {n: {"alone": [], "mixed": []} for n in sizes}
    with contextlib.ExitStack() as stack:
        systems: dict[int, Factory] = {}
        for n in sizes:
            cfg, ipc_dir = local_config(args.model, BatchingConfig(**{args.setting: n}))
            stack.enter_context(BackgroundFleet(cfg, ipc_dir))
            systems[n] = fleet_requester(cfg.frontend, args.model, args.max_tokens)
            progress(f"fleet up: {args.setting}={n}")
        for n, make in systems.items():  # warm-up
            run_load(make, 1, [long_prompt(f"warm {n}", args.long_words)])
        for r in range(args.repeats):
            for n, make in systems.items():
                alone = {long_prompt(f"alone {r}.{n}.{i}", args.long_words): "long" for i in range(args.alone)}
                results[n]["alone"].append(phase(make, 1, alone))
            for n, make in systems.items():
                qs = questions()
                mixed = {(long_prompt(f"mixed {r}.{n}.{i}", args.long_words) if i % args.long_every == 0
                          else f"(mixed {r}.{n}.{i}) {qs[i % len(qs)]}"): ("long" if i % args.long_every == 0 else "short")
                         for i in range(args.requests)}
                results[n]["mixed"].append(res := phase(make, args.clients, mixed))
                progress(f"{args.setting}={n} round {r}: {res['summary']['tok_per_s']:.1f} tok/s, "
                         f"short TTFT p50 {1000 * (res.get('short', {}).get('ttft_p50_s') or 0):.0f} ms")
    report = Report(args.name, f"{args.setting}: throughput and TTFT", environment(describe_blas(), args.model),
                    {k: v for k, v in vars(args).items() if k not in ("out", "quick", "name")})
    report.results = results
    report.add_markdown(markdown(results, args.setting))
    report.publish(args.out)
    return results


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def markdown(results: dict[int, dict[str, list[Any]]], setting: str = "prefill_step_size") -> str:
    """One row per value of ``setting``: each figure is the mean over the rounds."""
    def cell(v: float | None, scale: float, fmt: str) -> str:
        return "—" if v is None else fmt.format(v * scale)

    rows = [f"| {setting} | long prompt alone: TTFT p50 (ms) | mixed: tok/s | short TTFT p50 / p99 (ms) "
            "| long TTFT p50 / p99 (ms) | ITL p99 (ms) |", "|---|---|---|---|---|---|"]
    for n, r in results.items():
        alone = _mean([x.get("long", {}).get("ttft_p50_s") for x in r["alone"]])
        mixed = r["mixed"]
        tok = _mean([m["summary"]["tok_per_s"] for m in mixed])
        figs = {f"{kind}_{q}": _mean([m.get(kind, {}).get(f"ttft_{q}_s") for m in mixed])
                for kind in ("short", "long") for q in ("p50", "p99")}
        itl = _mean([m["summary"]["itl_p99_s"] for m in mixed])
        rows.append(f"| {n} | {cell(alone, 1000, '{:.0f}')} | {cell(tok, 1, '{:.1f}')} "
                    f"| {cell(figs['short_p50'], 1000, '{:.0f}')} / {cell(figs['short_p99'], 1000, '{:.0f}')} "
                    f"| {cell(figs['long_p50'], 1000, '{:.0f}')} / {cell(figs['long_p99'], 1000, '{:.0f}')} "
                    f"| {cell(itl, 1000, '{:.1f}')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
