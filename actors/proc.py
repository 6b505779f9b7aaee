"""Process helpers: what a child process offers, spawn-only start, and children that die with their parent."""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any, Callable, Protocol

PR_SET_PDEATHSIG = 1


class Process(Protocol):
    """What the registry needs of a child process; ``multiprocessing.Process`` has it all."""

    @property
    def pid(self) -> int | None:
        """The OS process id once started."""
        ...

    @property
    def exitcode(self) -> int | None:
        """None while it runs; its exit status (negative: killed by that signal) after."""
        ...

    def is_alive(self) -> bool:
        """True while it runs."""
        ...

    def terminate(self) -> None:
        """SIGTERM."""
        ...

    def kill(self) -> None:
        """SIGKILL."""
        ...

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for it to exit."""
        ...


def spawn_context() -> SpawnContext:
    """The only start method we use: forking after MLX has run hangs the child."""
    return multiprocessing.get_context("spawn")


def die_with_parent() -> None:
    """On Linux, ask the kernel to SIGTERM us when the parent dies (no orphans)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _child_main(target: Callable[..., None], args: tuple[Any, ...]) -> None:
    die_with_parent()
    target(*args)


def spawn_child(name: str, target: Callable[..., None], args: tuple[Any, ...]) -> BaseProcess:
    """Run ``target(*args)`` in a new spawned process that dies with this one; started."""
    proc = spawn_context().Process(target=_child_main, args=(target, args), name=name)
    proc.start()
    return proc
