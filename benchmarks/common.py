"""Shared benchmark plumbing: environment record, statistics, result files.

Every benchmark writes ``benchmarks/results/<name>.json`` (raw samples included)
and ``<name>.md``. Reports record the machine, package versions, BLAS, model and
git commit, so that a figure can be traced to what produced it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from actors.stats import percentile

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUESTIONS_FILE = Path(__file__).resolve().parent / "questions.txt"


def questions() -> list[str]:
    """The project's 50 fixed benchmark questions."""
    return [q for q in QUESTIONS_FILE.read_text().splitlines() if q.strip()]


def git_commit() -> str:
    """The checked-out commit (with '+dirty' when the tree has changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(blas: dict[str, Any] | None = None, model: str = "") -> dict[str, Any]:
    """Machine, versions, BLAS, model and commit for a report."""
    versions = {}
    for pkg in ("mlx", "mlx-lm", "pyzmq", "msgpack", "prometheus-client"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "platform": platform.platform(),
        "python": sys.version.split()[0], "cpu": cpu, "cores": os.cpu_count(), "packages": versions,
        "blas": blas or {}, "model": model, "commit": git_commit(),
    }


@dataclass
class Summary:
    """Descriptive statistics of one sample set (seconds unless named otherwise)."""

    n: int
    mean: float
    median: float
    p95: float
    p99: float
    stdev: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> "Summary":
        """Summarise ``values``; raises ValueError when empty."""
        data = list(values)
        if not data:
            raise ValueError("no samples")
        return cls(len(data), statistics.fmean(data), percentile(data, 50), percentile(data, 95), percentile(data, 99),
                   statistics.stdev(data) if len(data) > 1 else 0.0, min(data), max(data))


def ratio(a: float, b: float) -> float:
    """a / b, or NaN when b is 0."""
    return a / b if b else float("nan")


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min, max and relative half-range (%) of per-repeat figures."""
    mean = statistics.fmean(values)
    half_range_pct = (max(values) - min(values)) / 2 / mean * 100 if mean else 0.0
    return {"mean": mean, "min": min(values), "max": max(values), "half_range_pct": half_range_pct}


def within_noise(a: list[float], b: list[float]) -> bool:
    """True when the two configurations' per-repeat ranges overlap (difference below the noise)."""
    return max(min(a), min(b)) <= min(max(a), max(b))


@dataclass
class Report:
    """Collects a benchmark's results and writes JSON + Markdown."""

    name: str
    title: str
    env: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)

    def add_markdown(self, text: str) -> None:
        """Append a Markdown section."""
        self.sections.append(text.rstrip() + "\n")

    def write(self, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
        """Write ``<name>.json`` and ``<name>.md``; returns both paths."""
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out_dir / f"{self.name}.json", out_dir / f"{self.name}.md"
        json_path.write_text(json.dumps({"name": self.name, "env": self.env, "params": self.params,
                                         "results": self.results}, indent=1, default=_jsonable) + "\n")
        env = self.env
        header = (f"# {self.title}\n\n"
                  f"- when: {env.get('when')}; commit `{env.get('commit')}`\n"
                  f"- machine: {env.get('cpu')}, {env.get('cores')} cores, {env.get('platform')}\n"
                  f"- packages: " + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()) + "\n"
                  f"- BLAS: {env.get('blas', {}).get('name')} ({env.get('blas', {}).get('path')})\n"
                  f"- model: {env.get('model')}\n"
                  f"- parameters: " + ", ".join(f"{k}={v}" for k, v in self.params.items()) + "\n")
        md_path.write_text(header + "\n" + "\n".join(self.sections))
        return json_path, md_path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dict__"):
        return obj.__dict__
    return str(obj)


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with 2 decimals."""
    return f"{seconds * 1000:.2f}"


def progress(text: str) -> None:
    """A progress line on stderr (long runs show where they are)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
