"""The wheel users install: exactly our four packages, the demo model's data, and the `mlx-fleet` command.

Built with pip from a copy of what the build reads (pyproject.toml, README.md and the
packages' folders, so no build output of the checkout can leak in), without build
isolation: setuptools comes from the test environment and nothing is downloaded.
``tests`` and ``benchmarks`` stay out: they run from a checkout, and their names are other
projects' distributions on PyPI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_only_our_four_packages(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("actors", "broker", "workers", "mlx_fleet", "tests", "benchmarks"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr
    assert "deprecat" not in built.stderr.lower(), built.stderr  # e.g. a license table instead of an SPDX string
    (wheel,) = tmp_path.glob("mlx_fleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"actors", "broker", "workers", "mlx_fleet"}
    assert "workers/models/data/corpus.txt" in names
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "mlx-fleet = mlx_fleet.cli:main" in zipfile.ZipFile(wheel).read(meta).decode()
    license_line = [line for line in zipfile.ZipFile(wheel).read(meta.replace("entry_points.txt", "METADATA")).decode()
                    .splitlines() if line.startswith("License-Expression:")]
    assert license_line == ["License-Expression: MIT"]
