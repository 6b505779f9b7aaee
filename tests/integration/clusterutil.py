"""Helpers for the cluster tests: workers and CLI commands as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from broker.client import Client

ROOT = Path(__file__).resolve().parents[2]


def workers_of(client: Client, model: str) -> dict[str, dict[str, Any]]:
    """The registered workers of ``model`` by id (an empty map when the model is not listed)."""
    rows = client.status(timeout_s=5)["models"].get(model, {}).get("workers", [])
    # `workers` also lists the supervisor's children that are not registered (starting, restarting, hung, gave_up).
    return {w["worker_id"]: w for w in rows if w["state"] in ("ready", "retiring")}


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
