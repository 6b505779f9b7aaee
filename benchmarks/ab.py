"""Two running fleets side by side: the same requests to A and B, interleaved, in one run.

For comparing two versions or two configurations of the fleet on one machine, with
both alive for the whole run so that drift in the machine's load hits both equally.
Start each fleet yourself (each on its own ``--frontend``), serving the same model
under the same name, then:

    python -m benchmarks ab --a ipc:///tmp/a/front --b ipc:///tmp/b/front --model demo-small \\
        [--a-label before] [--b-label after] [--requests 40] [--levels 8,32] [--repeats 2]

Sequential part: ``--requests`` questions one at a time, alternating A and B request by
request (which goes first alternates too). Concurrent part: at each client count in
``--levels``, the same prompts through A, then through B, the order swapped every
repeat. Both parts use the same client code against both fleets (this checkout's
``Client``), so only the fleets differ.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.common import (
    Report, add_out_argument, cycled_questions, environment, fmt_ms, progress, ratio, spread, within_noise,
)
from benchmarks.load import fleet_requester, run_load

PER_CLIENT = 6  # prompts per client at each concurrent level


def sequential(args: argparse.Namespace) -> dict[str, Any]:
    """Alternating single requests; B against A (``compare``'s bare = A, served = B)."""
    from benchmarks.overhead import alternate, compare, run_served  # it preloads a BLAS: not at import
    from mlx_fleet.client import Client

    qs = cycled_questions(args.requests)
    with Client(args.a, timeout_s=120) as ca, Client(args.b, timeout_s=120) as cb:
        for q in qs[:3]:  # warm-up
            run_served(ca, args.model, q, args.max_tokens)
            run_served(cb, args.model, q, args.max_tokens)
        a, b = alternate(lambda q: run_served(ca, args.model, q, args.max_tokens),
                         lambda q: run_served(cb, args.model, q, args.max_tokens), qs, None)
    out = compare(a, b)
    out["tokens_per_request"] = sum(s.tokens for s in a) / len(a)
    return out


def concurrent(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    """Per level: each system's tok/s and TTFT per repeat, and their spread."""
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {n: {"a": [], "b": []} for n in levels}
    for rep in range(args.repeats):
        for n in levels:
            prompts = cycled_questions(n * PER_CLIENT)
            order = ("a", "b") if rep % 2 == 0 else ("b", "a")
            for side in order:
                run = run_load(fleet_requester(getattr(args, side), args.model, args.max_tokens), n, prompts)
                summary = run.summary()
                runs[n][side].append(summary)
                progress(f"ab: repeat {rep + 1} {n} clients {side}: {summary['tok_per_s']:.1f} tok/s")
    return {str(n): {side: {"runs": rs, **{k: spread([r[k] for r in rs]) for k in ("tok_per_s", "ttft_p50_s", "ttft_p99_s")}}
                     for side, rs in by_side.items()} for n, by_side in runs.items()}


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether two per-repeat ranges (``spread``'s min and max) overlap."""
    return within_noise([a["min"], a["max"]], [b["min"], b["max"]])


def markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    """The two tables."""
    la, lb = args.a_label, args.b_label
    s = r["sequential"]
    lines = [f"Both fleets stayed up for the whole run. {args.requests} sequential requests of {args.max_tokens} tokens "
             f"alternate between {la} and {lb}; then {PER_CLIENT} prompts per client at each client count, "
             f"{args.repeats} repeats, order swapped each repeat.\n",
             "## Sequential (1 client)\n", f"| metric | {la} (ms) | {lb} (ms) | {lb} − {la} (ms) | ratio |",
             "|---|---|---|---|---|"]
    for metric in ("ttft", "total"):
        for k in ("mean", "median", "p99"):
            m = s[metric]
            lines.append(f"| {metric} {k} | {fmt_ms(getattr(m['bare'], k))} | {fmt_ms(getattr(m['served'], k))} | "
                         f"{m['diff_ms'][k]:+.2f} | {m['ratio'][k]:.4f} |")
    per_token = s["total"]["diff_ms"]["mean"] / s["tokens_per_request"] if s["tokens_per_request"] else float("nan")
    pd = s["total"]["paired_diff"]
    lines.append(f"\nPer token, {lb} costs {per_token:+.3f} ms against {la} (mean response difference over "
                 f"{s['tokens_per_request']:.0f} tokens; paired stdev {fmt_ms(pd.stdev)} ms). "
                 f"Greedy token mismatches: {s['token_mismatches']}.\n")
    lines += ["## Concurrent\n", f"| clients | {la} tok/s | {lb} tok/s | {lb}/{la} | tok/s ranges overlap | "
              f"{la} TTFT p50 / p99 ms | {lb} TTFT p50 / p99 ms |", "|---:|---:|---:|---:|---|---|---|"]
    for n, sides in r["concurrent"].items():
        a, b = sides["a"], sides["b"]
        lines.append(f"| {n} | {a['tok_per_s']['mean']:.1f} ±{a['tok_per_s']['half_range_pct']:.1f}% | "
                     f"{b['tok_per_s']['mean']:.1f} ±{b['tok_per_s']['half_range_pct']:.1f}% | "
                     f"{ratio(b['tok_per_s']['mean'], a['tok_per_s']['mean']):.3f} | "
                     f"{'yes (within noise)' if _overlap(a['tok_per_s'], b['tok_per_s']) else 'no'} | "
                     f"{fmt_ms(a['ttft_p50_s']['mean'])} / {fmt_ms(a['ttft_p99_s']['mean'])} | "
                     f"{fmt_ms(b['ttft_p50_s']['mean'])} / {fmt_ms(b['ttft_p99_s']['mean'])} |")
    lines.append("\n± is the relative half-range across repeats (the noise).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both parts and write benchmarks/results/<name>.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="fleet A's frontend address")
    ap.add_argument("--b", required=True, help="fleet B's frontend address")
    ap.add_argument("--a-label", default="A")
    ap.add_argument("--b-label", default="B")
    ap.add_argument("--model", default="demo-small", help="the model name both fleets serve")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=50)
    ap.add_argument("--levels", default="8,32", help="client counts of the concurrent part (empty: none)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="ab")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    progress(f"ab: sequential, {args.requests} requests")
    result = {"sequential": sequential(args), "concurrent": concurrent(args, levels)}
    env = environment({"name": "each fleet's own", "path": "not loaded here"}, args.model)
    report = Report(args.name, f"Two fleets side by side: {args.a_label} and {args.b_label}", env,
                    {"a": f"{args.a_label} ({args.a})", "b": f"{args.b_label} ({args.b})", "requests": args.requests,
                     "max_tokens": args.max_tokens, "levels": levels, "repeats": args.repeats, "per_client": PER_CLIENT})
    report.results = result
    report.add_markdown(markdown(result, args))
    report.publish(args.out)
    return result


if __name__ == "__main__":
    main()
