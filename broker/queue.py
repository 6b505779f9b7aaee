"""A per-model queue: priorities with aging, and fair turns across clients.

Two rules order the waiting requests:

- **Between priorities, aging.** A request's score is ``rank * aging_s +
  enqueued_at_s``. Urgent (rank 0) goes before default (1) before background
  (2), but a background request that has waited ``2 * aging_s`` longer than an
  urgent one goes first. The priority whose next request has the lowest score
  is served.
- **Within a priority, clients take turns** (round-robin by client identity).
  A client's own requests go in arrival order; the clients with requests
  waiting form a rotation. Each dispatch serves the client at the front, and a
  client just served goes to the back while it still has requests waiting. A
  client that had nothing waiting joins at the back. So one client's flood of
  requests cannot starve another client: each waits for at most one request
  of every other client that was waiting before it.

``take`` is a dispatch (it moves the client's turn); ``remove`` is a cancel or
a timeout (the client keeps its place).
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Generic, Iterator, TypeVar

from actors.protocol import PRIORITIES, PRIORITY_RANK

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    """One waiting item."""

    key: str
    item: T
    rank: int
    client: bytes
    enqueued_at_s: float
    seq: int
    weight: int = 1  # sequences it stands for (a generate's n)

    def order(self) -> tuple[float, int]:
        """Arrival order within its client (a requeued item keeps its original arrival)."""
        return (self.enqueued_at_s, self.seq)


class _Turns(Generic[T]):
    """One priority's waiting items, per client, and the clients' rotation."""

    def __init__(self) -> None:
        # client -> its entries in arrival order; the dict's order is the rotation (front first).
        self.rotation: OrderedDict[bytes, list[_Entry[T]]] = OrderedDict()

    def add(self, entry: _Entry[T]) -> None:
        waiting = self.rotation.get(entry.client)
        if waiting is None:
            waiting = self.rotation[entry.client] = []  # joins at the back
        bisect.insort(waiting, entry, key=_Entry.order)

    def drop(self, entry: _Entry[T], *, served: bool) -> None:
        waiting = self.rotation[entry.client]
        i = bisect.bisect_left(waiting, entry.order(), key=_Entry.order)
        del waiting[i]
        if not waiting:
            del self.rotation[entry.client]
        elif served:
            self.rotation.move_to_end(entry.client)

    def service_order(self) -> Iterator[_Entry[T]]:
        """A snapshot of the order the entries would be served in, if nothing else arrived."""
        turns = deque((list(waiting), 0) for waiting in self.rotation.values())

        def walk() -> Iterator[_Entry[T]]:
            while turns:
                waiting, i = turns.popleft()
                yield waiting[i]
                if i + 1 < len(waiting):
                    turns.append((waiting, i + 1))

        return walk()


class PriorityQueue(Generic[T]):
    """Items ordered by priority with aging, and by client turns within a priority; removal by key."""

    def __init__(self, *, aging_s: float = 2.0) -> None:
        self.aging_s = aging_s
        self._items: dict[str, _Entry[T]] = {}
        self._classes: list[_Turns[T]] = [_Turns() for _ in PRIORITIES]
        self._seq = itertools.count()
        self._weight = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def sequences(self) -> int:
        """The items' total weight: sequences waiting (a generate with n completions counts n)."""
        return self._weight

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def score(self, priority: str, enqueued_at_s: float) -> float:
        """The aging score of a request; between priorities, lower goes first."""
        return PRIORITY_RANK[priority] * self.aging_s + enqueued_at_s

    def push(self, key: str, item: T, priority: str, enqueued_at_s: float, client: bytes = b"", weight: int = 1) -> None:
        """Add ``item`` under ``key`` for ``client``; a requeued item keeps its original arrival time."""
        self.remove(key)
        entry = _Entry(key, item, PRIORITY_RANK[priority], client, enqueued_at_s, next(self._seq), weight)
        self._items[key] = entry
        self._weight += weight
        self._classes[entry.rank].add(entry)

    def remove(self, key: str) -> T | None:
        """Take ``key`` out without using its client's turn (a cancel, a timeout)."""
        entry = self._items.pop(key, None)
        if entry is None:
            return None
        self._weight -= entry.weight
        self._classes[entry.rank].drop(entry, served=False)
        return entry.item

    def take(self, key: str) -> T | None:
        """Take ``key`` out to serve it: its client goes to the back of its priority's rotation."""
        entry = self._items.pop(key, None)
        if entry is None:
            return None
        self._weight -= entry.weight
        self._classes[entry.rank].drop(entry, served=True)
        return entry.item

    def waiting_clients(self) -> int:
        """Distinct clients with something waiting."""
        return len({c for turns in self._classes for c in turns.rotation})

    def ordered(self) -> Iterator[tuple[str, T]]:
        """Items in service order: a snapshot taken now, so the queue may change while it is read."""
        orders = [(rank, turns.service_order()) for rank, turns in enumerate(self._classes) if turns.rotation]
        return self._merge(orders)

    def _merge(self, orders: list[tuple[int, Iterator[_Entry[T]]]]) -> Iterator[tuple[str, T]]:
        # Each priority's own order is kept; between them, the lowest aging score of the next item wins.
        heads = {rank: next(it) for rank, it in orders}
        iters = dict(orders)
        while heads:
            rank = min(heads, key=lambda r: (r * self.aging_s + heads[r].enqueued_at_s, r))
            entry = heads[rank]
            yield entry.key, entry.item
            following = next(iters[rank], None)
            if following is None:
                del heads[rank]
            else:
                heads[rank] = following
