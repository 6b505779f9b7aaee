"""Shared benchmark plumbing: environment record, statistics, result files.

Every benchmark writes ``<out>/<name>.json`` (raw samples included), ``<name>.md``
and its PNG plots, where ``<out>`` is ``--out`` (default: ``$MLX_FLEET_BENCH_OUT``,
else ``benchmarks/results``). Reports record the machine, package versions, BLAS,
model and git commit, so that a figure can be traced to what produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
OUT_ENV = "MLX_FLEET_BENCH_OUT"  # set by ``python -m benchmarks --out DIR`` for every subcommand
PACKAGES = ("mlx", "mlx-cpu", "mlx-cuda-12", "mlx-cuda-13", "mlx-metal", "mlx-lm", "pyzmq", "msgpack",
            "prometheus-client", "numpy", "tokenizers")


def served_name(model: str) -> str:
    """The name a benchmark's fleet serves ``model`` under: a demo name as is, a folder by its base name."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", Path(model).name) or "model"


def results_dir() -> Path:
    """Where reports go unless told otherwise: ``$MLX_FLEET_BENCH_OUT`` or benchmarks/results."""
    return Path(os.environ[OUT_ENV]).expanduser() if os.environ.get(OUT_ENV) else RESULTS_DIR


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--out DIR`` option every benchmark takes."""
    parser.add_argument("--out", type=Path, default=results_dir(),
                        help=f"folder for the JSON, Markdown and PNG files (default: ${OUT_ENV} or benchmarks/results)")


def questions() -> list[str]:
    """The project's 50 fixed benchmark questions."""
    return [q for q in QUESTIONS_FILE.read_text().splitlines() if q.strip()]


def cycled_questions(count: int) -> list[str]:
    """``count`` questions: the fixed ones in order, from the start again as often as needed."""
    qs = questions()
    return (qs * (count // len(qs) + 1))[:count]


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
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue  # backend wheels: only the installed ones matter
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
        "blas": blas or {}, "model": model, "commit": git_commit(), "mlx_device": _mlx_device(),
    }


def _mlx_device() -> str | None:
    """MLX's default device, when this process has imported MLX (never imports it: BLAS first)."""
    mx = sys.modules.get("mlx.core")
    return str(mx.default_device()) if mx is not None else None


def env_markdown(env: dict[str, Any]) -> str:
    """The Markdown lines every report starts with: when, commit, machine, packages, BLAS, model."""
    blas = env.get("blas", {})
    device = f"; MLX device {env['mlx_device']}" if env.get("mlx_device") else ""
    return (f"- when: {env.get('when')}; commit `{env.get('commit')}`\n"
            f"- machine: {env.get('cpu')}, {env.get('cores')} cores, {env.get('platform')}{device}\n"
            f"- packages: python {env.get('python')}, " + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()) + "\n"
            f"- BLAS: {blas.get('name')} ({blas.get('path')})\n"
            f"- model: {env.get('model')}\n")


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

    def write(self, out_dir: Path | None = None) -> tuple[Path, Path]:
        """Write ``<name>.json`` and ``<name>.md`` into ``out_dir`` (default :func:`results_dir`)."""
        out_dir = Path(out_dir) if out_dir is not None else results_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out_dir / f"{self.name}.json", out_dir / f"{self.name}.md"
        json_path.write_text(json.dumps({"name": self.name, "env": self.env, "params": self.params,
                                         "results": self.results}, indent=1, default=_jsonable) + "\n")
        header = (f"# {self.title}\n\n" + env_markdown(self.env)
                  + "- parameters: " + ", ".join(f"{k}={v}" for k, v in self.params.items()) + "\n")
        md_path.write_text(header + "\n" + "\n".join(self.sections))
        return json_path, md_path

    def publish(self, out_dir: Path | None = None) -> tuple[Path, Path]:
        """:meth:`write`, say where on stderr, and print the Markdown report."""
        json_path, md_path = self.write(out_dir)
        progress(f"wrote {json_path} and {md_path}")
        print(md_path.read_text())
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
