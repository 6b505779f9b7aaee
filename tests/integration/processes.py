"""Processes a test starts and watches: CLI commands, remote workers, /proc.

``cli`` runs ``python -m fleet ...`` to completion; ``WorkerProcess`` keeps a
``mlx-fleet worker`` running; ``children_of``, ``is_gone`` and ``rss_kib`` read
/proc (Linux) about any process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout_s: float = 120.0, prefix: list[str] | None = None,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fleet ARGS`` from the repository root (``input_text`` on its stdin); returns the finished process."""
    cmd = [*(prefix or []), sys.executable, "-m", "fleet", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy(),
                          input=input_text)


class WorkerProcess:
    """``python -m fleet worker ...`` as a subprocess; a context manager that stops it."""

    def __init__(self, *args: str, prefix: list[str] | None = None, log_path: Path | None = None) -> None:
        self.cmd = [*(prefix or []), sys.executable, "-m", "fleet", "worker", *args]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "WorkerProcess":
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        return self

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (the worker says goodbye), then SIGKILL past the deadline."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self) -> str:
        """What it printed (when started with a log file)."""
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def write_worker_config(path: Path, **settings: Any) -> Path:
    """A TOML file of flat settings for `mlx-fleet worker --config` (heartbeat timing and the like)."""
    lines = [f"{k} = {v!r}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}" for k, v in settings.items()]
    path.write_text("\n".join(lines).replace("'", '"') + "\n")
    return path


def children_of(pid: int) -> list[int]:
    """The direct children of ``pid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def is_gone(pid: int) -> bool:
    """True once ``pid`` has exited (no such process, or a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
