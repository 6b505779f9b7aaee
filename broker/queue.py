"""A per-model priority queue with aging, so no class of work starves forever.

A request's score is ``rank * aging_s + enqueued_at_s``: urgent (rank 0) goes
before default (1) before background (2), but a background request that has
waited ``2 * aging_s`` longer than an urgent one goes first. The score is fixed
at enqueue time, so a plain heap orders it.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Generic, Iterator, TypeVar

from actors.protocol import PRIORITY_RANK

T = TypeVar("T")


class PriorityQueue(Generic[T]):
    """Items ordered by (priority rank, arrival) with aging; removal by key is O(1)."""

    def __init__(self, *, aging_s: float = 2.0) -> None:
        self.aging_s = aging_s
        self._heap: list[tuple[float, int, str]] = []
        self._items: dict[str, tuple[int, T]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def score(self, priority: str, enqueued_at_s: float) -> float:
        """The ordering key of a request; lower goes first."""
        return PRIORITY_RANK[priority] * self.aging_s + enqueued_at_s

    def push(self, key: str, item: T, priority: str, enqueued_at_s: float) -> None:
        """Add ``item`` under ``key``; a requeued item keeps its original arrival time."""
        seq = next(self._seq)
        self._items[key] = (seq, item)
        heapq.heappush(self._heap, (self.score(priority, enqueued_at_s), seq, key))

    def remove(self, key: str) -> T | None:
        """Take ``key`` out (lazily: its heap entry is skipped later)."""
        entry = self._items.pop(key, None)
        return None if entry is None else entry[1]

    def ordered(self) -> Iterator[tuple[str, T]]:
        """Live items in service order (a sorted snapshot; the queue may change meanwhile)."""
        self._compact()
        for _, seq, key in sorted(self._heap):
            if self._live(seq, key):
                yield key, self._items[key][1]

    def _live(self, seq: int, key: str) -> bool:
        entry = self._items.get(key)
        return entry is not None and entry[0] == seq

    def _compact(self) -> None:
        # Lazy deletion leaves dead entries; rebuild when they dominate.
        if len(self._heap) > 2 * len(self._items) + 64:
            self._heap = [e for e in self._heap if self._live(e[1], e[2])]
            heapq.heapify(self._heap)
