"""Multi-turn chat on several replicas: least-loaded against cache-aware routing, in one run.

For each replica count (``--replicas``, default 2 and 4) two fleets of SmolLM2 run side by side,
the same but for ``routing``: ``least_loaded`` (the replica with the most free slots) and
``cache_aware`` (the replica holding the longest cached prefix of the request, README, Routing).
Each round sends both the same workload, one fleet after the other, in an order that alternates
from round to round, so drift in the machine's load falls on both.

The workload: ``--conversations`` conversations at once, ``--turns`` turns each. Every
conversation shares one system prompt (about ``--system-tokens`` tokens); its first message
pastes a text of its own (about ``--document-tokens`` tokens, as a user asking about a document
does) and asks a question; each later turn asks a follow-up, resending the whole conversation.
A conversation waits a random ``0..--think-s`` seconds before each turn and starts at a random
moment of the first ``--arrive-over-s`` seconds (default 1), so new turns arrive while others
decode; a longer spread has conversations begin while others are midway, as users arrive.
Every round uses new conversations (tagged), so the only prefix shared across rounds is the
system prompt.

Reported per replica count and routing: TTFT p50/p99 at the client (all turns, and turns 2..N,
which a replica's prompt cache can serve), generated tok/s over the round's wall time, the
prompt-cache hit rate (prompt tokens reused over all prompt tokens, from each ``done``'s usage),
and how the broker routed. The target: cache-aware TTFT p50 at least 1.5x lower than
least-loaded, a higher hit rate, tok/s not lower.

    python -m benchmarks multiturn [--replicas 2,4] [--conversations 8] [--turns 4] [--rounds 2]
    python -m benchmarks --quick multiturn      # smoke run (not a result): demo model, 2 replicas, 1 round
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from workers.blas import find_blas, preload_blas

BLAS = preload_blas(find_blas("auto"))  # this process loads no model, but keep the workers' env identical

from actors.config import BatchingConfig  # noqa: E402
from actors.stats import percentile  # noqa: E402
from benchmarks.common import Report, add_out_argument, environment, progress, ratio  # noqa: E402
from benchmarks.overhead import local_config  # noqa: E402
from mlx_fleet.client import Client  # noqa: E402
from mlx_fleet.embedded import BackgroundFleet  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "workers" / "models" / "data" / "corpus.txt"
ROUTINGS = ("least_loaded", "cache_aware")
FOLLOW_UPS = ["What is the main point of that?", "Who would care about it, and why?", "Say it again more simply.",
              "What would you ask next?", "What is one thing it leaves out?", "Sum it up in one sentence."]
CHARS_PER_TOKEN = 4  # English text in SmolLM2's tokenizer, near enough to size the texts


@dataclass(frozen=True)
class Workload:
    """What every fleet is sent in a round: the same conversations, turn by turn."""

    system_prompt: str
    documents: tuple[str, ...]
    conversations: int
    turns: int
    max_tokens: int
    think_s: float
    arrive_over_s: float = 1.0  # each conversation starts at a random moment of this many seconds

    def first(self, c: int, tag: str) -> str:
        return f"[{tag}-{c}] Here is a text:\n\n{self.documents[c % len(self.documents)]}\n\nWhat is it about?"

    def follow_up(self, turn: int) -> str:
        return FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]


def make_workload(args: argparse.Namespace) -> Workload:
    """The system prompt and one text per conversation, cut from the bundled corpus."""
    words = CORPUS.read_text().split()
    def text(start: int, tokens: int) -> str:
        n = tokens * CHARS_PER_TOKEN // 6  # ~6 characters a word, space included
        return " ".join(words[(start + i) % len(words)] for i in range(n))
    system = "You are a careful reading assistant. Answer from the text you are given. " + text(0, args.system_tokens)
    docs = tuple(text(997 * (c + 1), args.document_tokens) for c in range(args.conversations))
    return Workload(system, docs, args.conversations, args.turns, args.max_tokens, args.think_s, args.arrive_over_s)


@dataclass
class Turn:
    """One turn as the client saw it."""

    conversation: int
    turn: int
    ttft_s: float
    total_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


def converse(addr: str, model: str, work: Workload, c: int, tag: str, seed: int, out: list[Turn],
             lock: threading.Lock) -> None:
    """One conversation, turn after turn, streamed; each turn's figures go to ``out``."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": work.system_prompt}, {"role": "user", "content": work.first(c, tag)}]
    time.sleep(rng.uniform(0.0, work.arrive_over_s))
    with Client(addr, timeout_s=600) as client:
        for t in range(work.turns):
            if t:
                time.sleep(rng.uniform(0.0, work.think_s))
            t0 = time.perf_counter()
            ttft_s = 0.0
            try:
                stream = client.stream(model=model, messages=messages, max_tokens=work.max_tokens)
                for chunk in stream:
                    if not ttft_s and chunk.token_ids:
                        ttft_s = time.perf_counter() - t0
                done = stream.completion
                assert done is not None
            except Exception as exc:  # counted as a failed turn; the conversation ends
                with lock:
                    out.append(Turn(c, t, 0.0, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}"[:200]))
                return
            total_s = time.perf_counter() - t0
            u = done.usage
            with lock:
                out.append(Turn(c, t, ttft_s or total_s, total_s, u.get("prompt_tokens", 0),
                                u.get("completion_tokens", 0), u.get("cached_tokens", 0)))
            messages += [{"role": "assistant", "content": done.text},
                         {"role": "user", "content": work.follow_up(t + 1)}]


def run_round(addr: str, model: str, work: Workload, tag: str, seed: int) -> tuple[list[Turn], float]:
    """Every conversation at once, one thread each; the turns and the wall time."""
    turns: list[Turn] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=converse, args=(addr, model, work, c, tag, seed * 1000 + c, turns, lock),
                                daemon=True) for c in range(work.conversations)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(1800)
    return turns, time.perf_counter() - t0


def summarize(rounds: list[tuple[list[Turn], float]]) -> dict[str, Any]:
    """The figures of one fleet over its rounds (pooled)."""
    turns = [t for ts, _ in rounds for t in ts]
    ok = [t for t in turns if not t.error]
    warm = [t.ttft_s for t in ok if t.turn > 0]
    ttft = [t.ttft_s for t in ok]
    wall = sum(w for _, w in rounds)
    prompt = sum(t.prompt_tokens for t in ok)

    def pct(values: list[float], q: float) -> float | None:
        return percentile(values, q) if values else None

    return {"turns": len(turns), "ok": len(ok), "errors": sorted({t.error for t in turns if t.error}),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "warm_ttft_p50_s": pct(warm, 50),
            "warm_ttft_p99_s": pct(warm, 99), "tok_per_s": sum(t.completion_tokens for t in ok) / wall if wall else 0.0,
            "tok_per_s_rounds": [sum(t.completion_tokens for t in ts if not t.error) / w for ts, w in rounds],
            "cache_hit_rate": sum(t.cached_tokens for t in ok) / prompt if prompt else None,
            "prompt_tokens": prompt, "wall_s": wall}


@contextlib.contextmanager
def fleets_for(args: argparse.Namespace, source: str, replicas: int) -> Iterator[dict[str, BackgroundFleet]]:
    """Both routings' fleets of ``replicas`` replicas, up; each replica's BLAS gets its share of the cores."""
    threads = str(max(1, (os.cpu_count() or 1) // replicas))
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    fleets: dict[str, BackgroundFleet] = {}
    try:
        os.environ["OPENBLAS_NUM_THREADS"] = threads  # the workers spawned below inherit it
        for routing in ROUTINGS:
            cfg, ipc_dir = local_config(args.model_name, BatchingConfig(), replicas, source=source, routing=routing,
                                        log_level="WARNING")
            cfg = dataclasses.replace(cfg, models=(dataclasses.replace(cfg.models[0], dtype=args.dtype),))
            fleets[routing] = BackgroundFleet(cfg, ipc_dir).start()
            progress(f"multiturn: {replicas} x {args.model_name} up, routing {routing}")
        yield fleets
    finally:
        for fleet in fleets.values():
            fleet.stop()
        if saved is None:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved


def fleet_view(addr: str, model: str) -> dict[str, Any]:
    """What the broker says it did: routed counts, and each replica's served count and capacity."""
    with Client(addr, timeout_s=30) as client:
        m = client.status()["models"][model]
    return {"routed": m.get("routed", {}), "served": {w["worker_id"]: w["served"] for w in m["workers"]},
            "capacity": {w["worker_id"]: w["capacity"] for w in m["workers"]},
            "blas": (m["workers"][0].get("info") or {}).get("blas")}


def measure(args: argparse.Namespace, source: str, work: Workload) -> dict[str, Any]:
    """Every replica count: both routings, ``--rounds`` rounds each, alternating."""
    results: dict[str, Any] = {}
    for n in args.replicas:
        with fleets_for(args, source, n) as fleets:
            for routing, fleet in fleets.items():  # warm-up: the system prompt once per replica, and one-off costs
                run_round(fleet.cfg.frontend, args.model_name,
                          dataclasses.replace(work, conversations=n, turns=1, arrive_over_s=1.0),
                          f"warm{n}{routing}", 7)
            rounds: dict[str, list[tuple[list[Turn], float]]] = {r: [] for r in ROUTINGS}
            for r in range(args.rounds):
                for routing in (ROUTINGS if r % 2 == 0 else ROUTINGS[::-1]):
                    got = run_round(fleets[routing].cfg.frontend, args.model_name, work, f"r{r}", r)
                    rounds[routing].append(got)
                    s = summarize([got])
                    progress(f"multiturn: {n} replicas, {routing}, round {r + 1}/{args.rounds}: TTFT p50 "
                             f"{s['ttft_p50_s'] or 0:.3f}s, {s['tok_per_s']:.1f} tok/s, hit {s['cache_hit_rate'] or 0:.2f}")
            results[str(n)] = {routing: summarize(rounds[routing]) | fleet_view(fleets[routing].cfg.frontend,
                                                                                  args.model_name)
                               for routing in ROUTINGS}
        by = results[str(n)]
        ll, ca = by["least_loaded"], by["cache_aware"]
        by["cache_aware_vs_least_loaded"] = {
            "ttft_p50_lower_by": ratio(ll["ttft_p50_s"], ca["ttft_p50_s"]) if ca["ttft_p50_s"] else None,
            "warm_ttft_p50_lower_by": ratio(ll["warm_ttft_p50_s"], ca["warm_ttft_p50_s"]) if ca["warm_ttft_p50_s"] else None,
            "tok_per_s": ratio(ca["tok_per_s"], ll["tok_per_s"]) if ll["tok_per_s"] else None,
            "hit_rate_gain": (ca["cache_hit_rate"] or 0) - (ll["cache_hit_rate"] or 0)}
    return results


def markdown(results: dict[str, Any], args: argparse.Namespace, work: Workload) -> str:
    """The side-by-side table, the ratios against the targets, and what the broker did."""
    lines = [f"{work.conversations} conversations, {work.turns} turns each, {args.rounds} round(s) per fleet, "
             f"alternating; shared system prompt ~{args.system_tokens} tokens, a ~{args.document_tokens}-token text "
             f"of its own in each conversation's first message, answers of at most {work.max_tokens} tokens, "
             f"0-{work.think_s:g} s between turns, starts spread over {work.arrive_over_s:g} s; greedy. "
             f"TTFT at the client; warm = turns 2..{work.turns}.\n",
             "| replicas | routing | TTFT p50 (s) | TTFT p99 (s) | warm TTFT p50 (s) | tok/s | cache hit rate "
             "| ok | routed |", "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for n in args.replicas:
        for routing in ROUTINGS:
            r = results[str(n)][routing]
            routed = ", ".join(f"{k} {v}" for k, v in sorted(r["routed"].items()) if v)
            lines.append(f"| {n} | {routing} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | "
                         f"{r['warm_ttft_p50_s']:.3f} | {r['tok_per_s']:.1f} | {r['cache_hit_rate']:.1%} | "
                         f"{r['ok']}/{r['turns']} | {routed} |")
    lines += ["", "| replicas | TTFT p50 lower by (target >= 1.5x) | warm TTFT p50 lower by | tok/s ratio "
              "(target >= 1) | hit rate gain (target > 0) |", "|---:|---:|---:|---:|---:|"]
    for n in args.replicas:
        q = results[str(n)]["cache_aware_vs_least_loaded"]
        lines.append(f"| {n} | x{q['ttft_p50_lower_by']:.2f} | x{q['warm_ttft_p50_lower_by']:.2f} | "
                     f"x{q['tok_per_s']:.2f} | {q['hit_rate_gain']:+.1%} |")
    if args.quick:
        lines.append("\n_Quick smoke run: demo model, one short round; the figures are not a result._")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every replica count with both routings and write <out>/<name>.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", default="2,4")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=200)
    ap.add_argument("--document-tokens", type=int, default=300)
    ap.add_argument("--think-s", type=float, default=0.5)
    ap.add_argument("--arrive-over-s", type=float, default=1.0,
                    help="each conversation starts at a random moment of this many seconds (open-loop arrivals)")
    ap.add_argument("--name", default="multiturn")
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): demo, 2 replicas, 1 short round")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    args.model_name, source, args.dtype = "smollm2", "smollm2", "float32"
    if args.quick:
        args.model_name, source, args.dtype, args.name = "demo", "demo", "auto", args.name + "_quick"
        args.replicas, args.conversations, args.turns, args.rounds, args.max_tokens = "2", 4, 2, 1, 8
    args.replicas = [int(x) for x in str(args.replicas).split(",")]
    if not args.quick:
        from workers.models.sources import resolve_source

        source = str(resolve_source("smollm2", "float32", progress=progress))
    work = make_workload(args)
    t0 = time.perf_counter()
    results = measure(args, source, work)
    blas = results[str(args.replicas[0])]["cache_aware"].get("blas")
    report = Report(args.name, f"Multi-turn chat on {', '.join(map(str, args.replicas))} replicas of "
                    f"{args.model_name}: least-loaded against cache-aware routing", environment(blas, args.model_name),
                    {k: v for k, v in vars(args).items() if k not in ("out",)} | {"run_s": round(time.perf_counter() - t0)})
    report.results = results
    report.add_markdown(markdown(results, args, work))
    report.publish(args.out)
    return results


if __name__ == "__main__":
    main()
