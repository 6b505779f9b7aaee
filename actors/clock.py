"""Clocks. Policies take a clock so unit tests can drive time without sleeping."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Anything with a monotonic ``now()`` in seconds."""

    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic``."""

    def now(self) -> float:
        """Seconds since an arbitrary point, never going backwards."""
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to; for tests."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self._now_s = start_s

    def now(self) -> float:
        """The current fake time in seconds."""
        return self._now_s

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("a clock never goes backwards")
        self._now_s += seconds

    def advance_ms(self, ms: float) -> None:
        """Move time forward by ``ms`` milliseconds."""
        self.advance(ms / 1000.0)
