"""Per-run metrics and the seed's table format, with the spread across repeats.

Pure: no MLX, no sockets. A configuration is measured ``R`` times; each figure in a
table is the mean over those repeats followed by ``±`` its relative half-range
(:func:`benchmarks.common.spread`), so a reader sees the noise next to the number.
Comparisons call a difference "within noise" when the per-repeat ranges overlap
(:func:`benchmarks.common.within_noise`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from benchmarks.common import Summary, ratio, spread, within_noise
from benchmarks.load import LoadRun

STAT_KEYS = ("mean", "median", "p95", "p99", "stdev")

# (metric key, column title, scale, digits) for the seed's table; latencies shown in ms.
SEED_COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    ("response_mean_s", "mean ms", 1000.0, 1),
    ("response_median_s", "median ms", 1000.0, 1),
    ("response_p95_s", "p95 ms", 1000.0, 1),
    ("response_p99_s", "p99 ms", 1000.0, 1),
    ("response_stdev_s", "stddev ms", 1000.0, 1),
    ("ttft_mean_s", "TTFT mean ms", 1000.0, 1),
    ("tok_per_s", "tok/s", 1.0, 1),
    ("total_s", "total s", 1.0, 2),
    ("success_rate", "success %", 100.0, 1),
    ("tokens", "tokens", 1.0, 0),
)
TTFT_COLUMNS: tuple[tuple[str, str, float, int], ...] = tuple(
    (f"ttft_{k}_s", f"TTFT {'stddev' if k == 'stdev' else k} ms", 1000.0, 1) for k in STAT_KEYS)

# (metric key, label, True when lower is better) for comparisons between configurations.
COMPARED: tuple[tuple[str, str, bool], ...] = (
    ("response_mean_s", "mean response", True),
    ("response_p99_s", "p99 response", True),
    ("ttft_mean_s", "TTFT mean", True),
    ("tok_per_s", "tok/s", False),
)


def run_metrics(run: LoadRun) -> dict[str, float]:
    """The seed's metric set for one run: response and TTFT statistics (s), tok/s, totals.

    Statistics cover successful requests only; with none, they are NaN.
    """
    ok = run.ok
    out: dict[str, float] = {
        "requests": float(len(run.samples)), "ok": float(len(ok)),
        "success_rate": len(ok) / len(run.samples) if run.samples else 0.0,
        "tokens": float(sum(s.completion_tokens for s in ok)), "total_s": run.wall_s,
    }
    out["tok_per_s"] = out["tokens"] / run.wall_s if run.wall_s > 0 else 0.0
    for name, values in (("response", [s.total_s for s in ok]), ("ttft", [s.ttft_s for s in ok])):
        summary = Summary.of(values) if values else None
        for k in STAT_KEYS:
            out[f"{name}_{k}_s"] = getattr(summary, k) if summary else math.nan
    return out


def per_repeat(runs: Sequence[dict[str, float]], key: str) -> list[float]:
    """One metric's value in each repeat."""
    return [r[key] for r in runs]


def fmt_spread(values: Sequence[float], *, scale: float = 1.0, digits: int = 1) -> str:
    """``mean ±half-range%`` of per-repeat values (just the mean for one repeat)."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return "—"
    s = spread([v * scale for v in clean])
    text = f"{s['mean']:.{digits}f}"
    return text if len(clean) == 1 else f"{text} ±{s['half_range_pct']:.1f}%"


def metrics_table(results: dict[str, list[dict[str, float]]], labels: dict[str, str],
                  columns: Sequence[tuple[str, str, float, int]] = SEED_COLUMNS) -> str:
    """Rows = configurations, columns = metrics, each cell ``mean ±spread``."""
    lines = ["| configuration | " + " | ".join(c[1] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for key, runs in results.items():
        cells = [fmt_spread(per_repeat(runs, m), scale=scale, digits=digits) for m, _, scale, digits in columns]
        lines.append(f"| {labels.get(key, key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(a: Sequence[float], b: Sequence[float]) -> str:
    """'within noise' when the per-repeat ranges overlap, 'beyond noise' when not; one repeat says so."""
    if len(a) < 2 or len(b) < 2:
        return "one repeat: noise unknown"
    return "within noise" if within_noise(list(a), list(b)) else "beyond noise"


def compare(runs: Sequence[dict[str, float]], base: Sequence[dict[str, float]], key: str) -> dict[str, Any]:
    """One metric of a configuration against a baseline: ratio and change of the means, and the verdict."""
    a, b = per_repeat(runs, key), per_repeat(base, key)
    mean_a, mean_b = spread(a)["mean"], spread(b)["mean"]
    r = ratio(mean_a, mean_b)
    return {"metric": key, "value": mean_a, "baseline": mean_b, "ratio": r, "change_pct": (r - 1) * 100,
            "verdict": verdict(a, b)}


def comparison_table(results: dict[str, list[dict[str, float]]], labels: dict[str, str], baseline: str) -> str:
    """Each configuration against ``baseline``: ``change% (verdict)`` per compared metric."""
    if baseline not in results:
        return f"(no {labels.get(baseline, baseline)} in this run)"
    lines = ["| configuration | " + " | ".join(f"{label} vs {labels.get(baseline, baseline)}" for _, label, _ in COMPARED) + " |",
             "|---|" + "---|" * len(COMPARED)]
    for key, runs in results.items():
        if key == baseline:
            continue
        cells = []
        for metric, _, lower_better in COMPARED:
            c = compare(runs, results[baseline], metric)
            if math.isnan(c["ratio"]):
                cells.append("—")
                continue
            better = (c["ratio"] < 1) == lower_better
            word = "" if c["verdict"] != "beyond noise" else (", better" if better else ", worse")
            cells.append(f"{c['change_pct']:+.1f}% ({c['verdict']}{word})")
        lines.append(f"| {labels.get(key, key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
