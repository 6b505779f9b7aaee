"""The summary of a GPU check (:mod:`benchmarks.gpu_check`): one table per question it asks.

Pure: reads the parts' reports (the JSON each benchmark writes) and renders Markdown.

- Sequential overhead, one row per setting, each switching one candidate cause on or off:
  other systems alive, back-to-back requests, the client thread. Each row gives the fleet's
  default configuration against bare ``stream_generate``, with the path its requests took and
  the worker's own share of its busy time.
- The batch path: the fleet against the bare ``BatchGenerator`` at 8 clients.
- The concurrency sweep: tok/s, TTFT p99 and failures per system and client count.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

from benchmarks.fleet_probe import merge

BARE, DEFAULT = "bare", "fast-path"
CAUSE_ROWS = (  # part, systems alive, order, the fleet's client
    ("seed", "4 (bare, v1.4.1, default, mlx_lm.server)", "back to back", "client thread"),
    ("seq2", "2 (bare, default)", "back to back", "client thread"),
    ("seq2_alternating", "2 (bare, default)", "alternating", "client thread"),
    ("seq2_alternating_direct", "2 (bare, default)", "alternating", "main thread"),
)


def _mean(runs: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in runs if not math.isnan(r.get(key, math.nan))]
    return statistics.fmean(values) if values else math.nan


def _engine_cells(engine: dict[str, Any]) -> str:
    if not engine:
        return "— | —"
    p = engine["paths"]
    return f"{p['solo']}/{p['batch']}/{p['handoff']} | {engine['own_pct']:.1f}"


def cause_table(parts: dict[str, dict[str, Any]]) -> str:
    """Fleet (default) vs bare, sequential, one row per setting (seed's parts, then overhead.py)."""
    lines = ["| part | systems alive | order | fleet client | fleet mean ms | bare mean ms | mean Δ | "
             "TTFT p50 Δ ms | fleet paths solo/batch/handoff | own % of busy |", "|---|---|---|---|" + "---:|" * 6]
    for name, alive, order, client in CAUSE_ROWS:
        results = (parts.get(name, {}).get("report") or {}).get("results") or {}
        seq = (results.get("metrics") or {}).get("sequential") or {}
        fleet, bare = seq.get(DEFAULT) or [], seq.get(BARE) or []
        if not fleet or not bare:
            lines.append(f"| {name} | {alive} | {order} | {client} | {_status(parts, name)} |" + " |" * 5)
            continue
        f_mean, b_mean = _mean(fleet, "response_mean_s"), _mean(bare, "response_mean_s")
        ttft = (_mean(fleet, "ttft_median_s") - _mean(bare, "ttft_median_s")) * 1000
        engine = merge([e for e in ((results.get("engine") or {}).get("sequential") or {}).get(DEFAULT, []) if e])
        lines.append(f"| {name} | {alive} | {order} | {client} | {f_mean * 1000:.1f} | {b_mean * 1000:.1f} | "
                     f"{(f_mean / b_mean - 1) * 100:+.1f}% | {ttft:+.1f} | {_engine_cells(engine)} |")
    over = (parts.get("overhead", {}).get("report") or {}).get("results") or {}
    if over.get("total"):
        f_mean, b_mean = over["total"]["served"]["mean"], over["total"]["bare"]["mean"]
        lines.append(f"| overhead | 2 (bare, default) | alternating | main thread | {f_mean * 1000:.1f} | "
                     f"{b_mean * 1000:.1f} | {(f_mean / b_mean - 1) * 100:+.1f}% | "
                     f"{over['ttft']['diff_ms']['median']:+.1f} | {_engine_cells(over.get('engine') or {})} |")
    else:
        lines.append(f"| overhead | 2 (bare, default) | alternating | main thread | {_status(parts, 'overhead')} |" + " |" * 5)
    return "\n".join(lines)


def batch_table(parts: dict[str, dict[str, Any]]) -> str:
    """The seed part's concurrent variant: every configuration against the bare BatchGenerator."""
    results = (parts.get("seed", {}).get("report") or {}).get("results") or {}
    conc = (results.get("metrics") or {}).get("concurrent") or {}
    bare = _mean(conc.get(BARE) or [], "tok_per_s")
    if not conc:
        return f"(no concurrent run: {_status(parts, 'seed')})"
    lines = ["| configuration | tok/s | × bare BatchGenerator | TTFT mean ms | paths solo/batch/handoff | own % of busy |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, runs in conc.items():
        if not runs:
            continue
        tok = _mean(runs, "tok_per_s")
        engine = merge([e for e in (results.get("engine") or {}).get("concurrent", {}).get(key, []) if e])
        lines.append(f"| {key} | {tok:.1f} | {tok / bare if bare else math.nan:.3f} | "
                     f"{_mean(runs, 'ttft_mean_s') * 1000:.1f} | {_engine_cells(engine)} |")
    return "\n".join(lines)


def concurrency_table(parts: dict[str, dict[str, Any]]) -> str:
    """tok/s, TTFT p99 and failures per system and client count."""
    results = (parts.get("concurrency", {}).get("report") or {}).get("results") or {}
    if not results:
        return f"(no concurrency sweep: {_status(parts, 'concurrency')})"
    lines = ["| system | clients | tok/s | TTFT p99 ms | failed |", "|---|---:|---:|---:|---:|"]
    for system, by_level in results.items():
        for level, r in sorted(by_level.items(), key=lambda kv: int(kv[0])):
            s = r["summary"]
            p99 = "—" if s.get("ttft_p99_s") is None else f"{s['ttft_p99_s'] * 1000:.0f}"
            lines.append(f"| {system} | {level} | {s['tok_per_s']:.1f} | {p99} | {s['requests'] - s['ok']} |")
    return "\n".join(lines)


def _status(parts: dict[str, dict[str, Any]], name: str) -> str:
    part = parts.get(name)
    if part is None:
        return "not run"
    return part.get("status", "?") + (f": {part['why']}" if part.get("why") else "")


def summary_markdown(check: dict[str, Any]) -> str:
    """The whole report: how the run went, the three tables, then every part's own report."""
    cal, parts = check.get("calibration") or {}, check.get("parts") or {}
    out = ["# GPU check: where the serving overhead comes from", "",
           f"- model: `{check.get('model')}`, {check.get('max_tokens')} tokens per sequential request",
           f"- GPU: {cal.get('gpu', '?')}; MLX {cal.get('mlx', '?')} on `{cal.get('device', '?')}`",
           f"- calibration: load {cal.get('load_s', math.nan):.1f} s; one sequential request "
           f"{cal.get('t_req_s', math.nan) * 1000:.0f} ms (TTFT {cal.get('ttft_s', math.nan) * 1000:.0f} ms)"]
    if cal.get("error"):
        out += ["", "**Calibration failed:**", "", "```", cal["error"], "```"]
    out += ["", "| part | status | seconds | allotted |", "|---|---|---:|---:|"]
    for name, p in parts.items():
        out.append(f"| {name} | {_status(parts, name)} | {p.get('seconds', 0):.0f} | {p.get('allotted_s', 0):.0f} |")
    out += ["", "## Sequential: fleet (default) against bare `stream_generate`, one candidate cause per row", "",
            cause_table(parts), "",
            "## Batch path: 8 clients against the bare `BatchGenerator`", "", batch_table(parts), "",
            "## Concurrency sweep", "", concurrency_table(parts)]
    for name, p in parts.items():
        if p.get("markdown"):
            body = p["markdown"].split("\n", 1)[1] if p["markdown"].startswith("# ") else p["markdown"]
            out += ["", f"## Part `{name}`", "", re.sub(r"^(#+) ", r"#\1 ", body, flags=re.M)]
        if p.get("stderr_tail"):
            out += ["", f"Last lines of `{name}`'s stderr:", "", "```", p["stderr_tail"], "```"]
    if cal.get("log"):
        out += ["", "## Log", "", "```", *cal["log"], "```"]
    return "\n".join(out) + "\n"
