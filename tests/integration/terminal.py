"""A child process on a pseudo-terminal, as a person at a terminal runs it."""

from __future__ import annotations

import os
import pty
import select
import signal
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Terminal:
    """A child process on a pseudo-terminal, and everything it printed."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the command
            os.chdir(ROOT)
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            # Started with SIGINT ignored, as a shell script's background job is: chat must
            # still take Ctrl-C (an ignored signal stays ignored across exec).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.execv(argv[0], argv)
        self.output = b""
        self.exit_code: int | None = None

    def expect(self, text: str, *, after: int = 0, timeout_s: float = 60.0) -> int:
        """Read until ``text`` appears past offset ``after``; returns where it ends."""
        deadline = time.monotonic() + timeout_s
        needle = text.encode()
        while (at := self.output.find(needle, after)) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} within {timeout_s}s; got {self.output[-400:]!r}")
            if select.select([self.fd], [], [], min(left, 0.5))[0]:
                try:
                    self.output += os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    raise AssertionError(f"terminal closed before {text!r}; got {self.output[-400:]!r}") from None
        return at + len(needle)

    def read_ready(self) -> None:
        """Take what the child has printed so far, without waiting (so it never blocks on a full terminal)."""
        while select.select([self.fd], [], [], 0)[0]:
            try:
                self.output += os.read(self.fd, 4096)
            except OSError:
                return

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout_s: float = 20.0) -> int:
        """The exit status; kills the child and fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_code = os.waitstatus_to_exitcode(status)
                os.close(self.fd)
                return self.exit_code
            select.select([self.fd], [], [], 0.1)
            try:
                self.output += os.read(self.fd, 4096)
            except OSError:
                pass
        self.kill()
        raise AssertionError(f"chat did not exit; got {self.output[-400:]!r}")

    def kill(self) -> None:
        """End the child if it still runs."""
        if self.exit_code is None:
            os.kill(self.pid, 9)
            self.exit_code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            os.close(self.fd)
