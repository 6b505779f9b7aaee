"""Request deadlines in one heap, so the broker knows when the next one falls due.

The broker wakes at the earliest deadline rather than finding it on its next
periodic tick, which makes a deadline precise to about a millisecond. Entries
of requests that ended early stay in the heap until they surface or the heap
is rebuilt (when stale entries outnumber live ones).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable


class Deadlines:
    """A min-heap of (deadline_s, key) with lazy deletion."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, key: str, deadline_s: float) -> None:
        """Watch ``key``'s deadline."""
        heapq.heappush(self._heap, (deadline_s, key))

    def next_s(self, live: Callable[[str, float], bool]) -> float:
        """The earliest deadline still ``live`` (math.inf if none); drops stale entries on the way."""
        while self._heap and not live(self._heap[0][1], self._heap[0][0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else math.inf

    def due(self, now_s: float, live: Callable[[str, float], bool]) -> list[str]:
        """Keys whose live deadline is at or before ``now_s``, earliest first (each returned once)."""
        out: list[str] = []
        while self._heap and self._heap[0][0] <= now_s:
            deadline_s, key = heapq.heappop(self._heap)
            if live(key, deadline_s):
                out.append(key)
        return out

    def compact(self, live: Callable[[str, float], bool], live_count: int) -> None:
        """Rebuild without stale entries once they dominate (requests that ended before their deadline)."""
        if len(self._heap) > 2 * live_count + 1024:
            self._heap = [e for e in self._heap if live(e[1], e[0])]
            heapq.heapify(self._heap)
