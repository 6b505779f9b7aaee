"""PNG plots for the reports: latency CDFs, and throughput or TTFT against concurrency.

matplotlib is optional (the ``bench`` extra). Without it every function returns
None and :func:`plot_links` says in the report how to get the plots; a benchmark
never fails for want of a plot.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

MISSING = "plots skipped: matplotlib is not installed (pip install -e '.[bench]', or scripts/bench.sh)"
_warned = [False]


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None (with one message on stderr)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned[0]:
            print(MISSING, file=sys.stderr, flush=True)
            _warned[0] = True
        return None
    return plt


def available() -> bool:
    """Whether matplotlib can be imported here."""
    return _pyplot() is not None


def _save(plt: Any, fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdf(series: dict[str, Sequence[float]], path: Path, *, title: str,
                xlabel: str = "latency (ms)", scale: float = 1000.0) -> Path | None:
    """One empirical CDF line per series (values in seconds, shown × ``scale``); the PNG's path."""
    plt = _pyplot()
    if plt is None or not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, values in series.items():
        xs = sorted(v * scale for v in values)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=f"{name} (n={len(xs)})")
    ax.set(title=title, xlabel=xlabel, ylabel="fraction of requests ≤ x", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(plt, fig, path)


def against_concurrency(series: dict[str, dict[int, float]], path: Path, *, title: str, ylabel: str,
                        log_x: bool = True) -> Path | None:
    """One line per system: a metric (already scaled) against client count; the PNG's path."""
    plt = _pyplot()
    if plt is None or not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, by_level in series.items():
        levels = sorted(by_level)
        if levels:
            ax.plot(levels, [by_level[n] for n in levels], marker="o", label=name)
    if log_x:
        ax.set_xscale("log", base=2)
    all_levels = sorted({n for by_level in series.values() for n in by_level})
    ax.set_xticks(all_levels, [str(n) for n in all_levels])
    ax.set(title=title, xlabel="concurrent clients", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_links(plots: Sequence[tuple[str, Path | None]]) -> str:
    """Markdown image links (relative: the PNGs sit next to the report), or why there are none."""
    made = [(caption, p) for caption, p in plots if p is not None]
    if not made:
        return "" if not plots else f"_({MISSING})_" if not available() else "_(plots skipped: no data)_"
    return "\n\n".join(f"![{caption}]({p.name})" for caption, p in made)
