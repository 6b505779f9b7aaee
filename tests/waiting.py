"""Waiting on a condition with a deadline: how every test that starts processes waits.

A test never sleeps and hopes. It names what it waits for, polls a predicate that
reads the real state (a status reply, a log line, /proc) and fails, naming that
condition, once the deadline passes. Nothing here imports mlx-fleet, so the
conformance suite can use it against any fleet.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")

POLL_INTERVAL_S = 0.05


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, *, interval_s: float = POLL_INTERVAL_S,
             ignoring: tuple[type[BaseException], ...] = (), seen: Callable[[], object] | None = None) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that value.

    ``timeout_s`` bounds the whole wait; past it the test fails with an ``AssertionError``
    that names ``what`` (say what is awaited: "the worker to register"). ``interval_s``
    is the pause between polls (0 polls back to back, for a predicate that itself
    blocks on a socket). An exception of a type in ``ignoring`` counts as "not yet"
    (a fleet still coming up may time out a status call); any other exception, an
    assertion among them, ends the wait at once. ``seen``, when given, is called at
    the deadline and what it returns goes into the failure message (the last status).
    """
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()  # never set: its wait is the pause between polls
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignoring as exc:
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            hint = f"; last error: {last_error!r}" if last_error is not None else ""
            hint += f"; seen: {seen()!r}" if seen is not None else ""
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}{hint}")
        pause.wait(interval_s)


def assert_never(predicate: Callable[[], object], duration_s: float, what: str, *,
                 interval_s: float = POLL_INTERVAL_S) -> None:
    """Poll ``predicate`` for ``duration_s`` and fail as soon as it holds (``what`` names the event).

    The other side of :func:`wait_for`: for a thing that must not happen, such as an
    unauthorised worker registering. The duration is how long the test watches.
    """
    deadline = time.monotonic() + duration_s
    pause = threading.Event()
    while time.monotonic() < deadline:
        if predicate():
            raise AssertionError(f"{what} happened")
        pause.wait(interval_s)
