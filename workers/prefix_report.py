"""What a worker tells the broker about its prompt cache: the prefix keys it holds. Pure, no clock needed.

The broker routes a request to the replica holding the longest prefix of it
(:mod:`broker.routing`), so it mirrors the prefix keys (:mod:`actors.prefix_keys`) of each
worker's prompt cache. The I/O thread keeps a :class:`PrefixReporter`:

- when a request finishes, its entry's keys (its prompt followed by its answer) wait here under
  the request's key, in case the cache keeps that entry (:meth:`finished`);
- when the loop reports which entries the cache holds (it labels each with the request that
  stored it), the keys of entries that arrived are added and those of entries that left are
  removed (:meth:`cache_now`); a key stays while any held entry has it;
- :meth:`reports` says what to send: the change since the last report, or everything (``full``)
  after :meth:`owe_full`, which the I/O thread calls when it registers with a broker (a new
  broker, or a new connection, knows nothing of us) and when a report could not be sent.

A worker that restarts starts with an empty cache, and its first full report says so.
Bounds: at most ``max_pending`` finished requests wait for the cache's word (the oldest go
first), and each report holds at most ``MAX_PREFIX_REPORT`` keys (a longer one continues in the
next message).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

from actors.protocol import MAX_PREFIX_REPORT, Prefixes

MAX_PENDING = 256


class PrefixReporter:
    """The prefix keys of one worker's prompt cache, and what the broker has been told of them."""

    def __init__(self, worker_id: str, *, max_pending: int = MAX_PENDING, max_report: int = MAX_PREFIX_REPORT) -> None:
        self.worker_id = worker_id
        self.max_pending = max_pending
        self.max_report = max_report
        self._pending: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._held: dict[str, tuple[int, ...]] = {}  # entry label -> its keys
        self._counts: Counter[int] = Counter()  # key -> held entries that have it
        self._added: set[int] = set()
        self._removed: set[int] = set()
        self._full_owed = True
        self.unknown = 0  # entries the cache holds whose keys were never known (counted, reported as none)

    @property
    def keys_held(self) -> int:
        """Distinct keys of the entries held."""
        return len(self._counts)

    def finished(self, label: str, keys: Sequence[int]) -> None:
        """A request finished: its entry's keys, kept until the cache says whether it stored it."""
        self._pending[label] = tuple(keys)
        self._pending.move_to_end(label)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    def cache_now(self, labels: Iterable[str]) -> None:
        """The prompt cache holds exactly the entries ``labels`` now."""
        now = set(labels)
        gone = [held for held in self._held if held not in now]
        for label in now - self._held.keys():  # arrivals first: a key an arrival shares with a departure stays put
            keys = self._pending.pop(label, None)
            if keys is None:
                self.unknown += 1
                keys = ()
            self._held[label] = keys
            for key in keys:
                self._counts[key] += 1
                if self._counts[key] == 1:
                    self._removed.discard(key)
                    self._added.add(key)
        for label in gone:
            for key in self._held.pop(label):
                self._counts[key] -= 1
                if self._counts[key] <= 0:
                    del self._counts[key]
                    self._added.discard(key)
                    self._removed.add(key)

    def owe_full(self) -> None:
        """The next report replaces everything the broker knows (a new registration, or a report lost)."""
        self._full_owed = True

    def reports(self) -> list[Prefixes]:
        """What to send now: a full snapshot when owed, else the change since the last report ([] if none)."""
        if self._full_owed:
            self._full_owed = False
            self._added.clear()
            self._removed.clear()
            return self._chunks(sorted(self._counts), [], full=True)
        if not self._added and not self._removed:
            return []
        added, removed = sorted(self._added), sorted(self._removed)
        self._added.clear()
        self._removed.clear()
        return self._chunks(added, removed, full=False)

    def _chunks(self, added: list[int], removed: list[int], *, full: bool) -> list[Prefixes]:
        out: list[Prefixes] = []
        step = self.max_report
        while True:
            take_removed, removed = removed[:step], removed[step:]
            room = step - len(take_removed)
            take_added, added = added[:room], added[room:]
            out.append(Prefixes(self.worker_id, full and not out, take_added, take_removed))
            if not added and not removed:
                return out
