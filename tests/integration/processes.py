"""Processes a test starts and watches: CLI commands, remote workers, /proc.

``cli`` runs ``python -m mlx_fleet ...`` to completion; ``FleetProcess`` keeps one
running (``mlx-fleet up``; ``WorkerProcess`` for ``mlx-fleet worker``) with its
output in a log; ``children_of``, ``is_gone`` and ``rss_kib`` read /proc (Linux)
about any process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout_s: float = 120.0, prefix: list[str] | None = None,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mlx_fleet ARGS`` from the repository root (``input_text`` on its stdin); returns the finished process."""
    cmd = [*(prefix or []), sys.executable, "-m", "mlx_fleet", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy(),
                          input=input_text)


class FleetProcess:
    """``python -m mlx_fleet COMMAND ARGS`` as a subprocess (``up``, ``worker``); a context manager that stops it.

    ``prefix`` runs it through another command (``ip netns exec NS``); ``log_path``
    keeps what it prints; ``env`` replaces the test's environment.
    """

    def __init__(self, command: str, *args: str, prefix: list[str] | None = None, log_path: Path | None = None,
                 env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.cmd = [*(prefix or []), sys.executable, "-m", "mlx_fleet", command, *args]
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.new_session = False  # a process group of its own, which stop_group() stops whole
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def shell(cls, text: str, *, cwd: Path, log_path: Path, env: dict[str, str]) -> "FleetProcess":
        """A command line run by bash as a reader would type it, in a process group of its own; bash
        ``exec``s it, so signals reach it."""
        proc = cls("", log_path=log_path, env=env, cwd=cwd)
        proc.cmd = ["bash", "-c", f"exec {text}"]
        proc.new_session = True
        return proc

    def stop_group(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to its whole process group, as a service manager stops a job; returns once every process
        of the group has exited (fails, after SIGKILL, past ``timeout_s``)."""
        assert self.proc is not None and self.new_session, "stop_group() needs a process group of its own (shell())"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
            wait_for(lambda: not group_members(self.proc.pid), timeout_s, "every process of the group to exit")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def start(self) -> "FleetProcess":
        """Start it (once)."""
        if self.log_path is None:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                         env=self.env or os.environ.copy(), start_new_session=self.new_session)
        else:
            with open(self.log_path, "wb") as out:
                self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                             env=self.env or os.environ.copy(), start_new_session=self.new_session)
        return self

    def __enter__(self) -> "FleetProcess":
        return self.start()

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def wait_logged(self, text: str, timeout_s: float, what: str) -> None:
        """Wait until the log shows ``text``; fail at once, with the log's tail, if the process exits first."""
        def logged() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"exited before {what}: {self.log()[-3000:]}"
            return text in self.log()

        wait_for(logged, timeout_s, what, interval_s=0.2)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (a worker says goodbye, ``up`` drains), then SIGKILL past the deadline; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.new_session:  # nothing it started outlives it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self) -> str:
        """What it printed (when started with a log file)."""
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


class WorkerProcess(FleetProcess):
    """``python -m mlx_fleet worker ARGS``: a worker that joins a broker from outside the fleet."""

    def __init__(self, *args: str, prefix: list[str] | None = None, log_path: Path | None = None) -> None:
        super().__init__("worker", *args, prefix=prefix, log_path=log_path)


def write_config(path: Path, **settings: Any) -> Path:
    """A TOML file of flat settings, for ``--config`` of ``mlx-fleet up`` or ``mlx-fleet worker``."""
    lines = [f"{k} = {v!r}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}" for k, v in settings.items()]
    path.write_text("\n".join(lines).replace("'", '"') + "\n")
    return path


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry))
    return out


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
