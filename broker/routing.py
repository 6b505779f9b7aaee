"""Which worker takes a request: affinity first, then the replica with most free slots.

Pure helpers of :class:`broker.state.BrokerState`; no sockets, no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from broker.records import RequestRecord, WorkerRecord


class Affinity:
    """Affinity keys (model, key) bound to a worker identity; only the most recent ``max_keys`` are kept."""

    def __init__(self, max_keys: int = 65_536) -> None:
        self.max_keys = max_keys
        self._bound: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._bound)

    def get(self, model: str, key: str) -> bytes | None:
        """The worker ``key`` is bound to for ``model``, if any."""
        return self._bound.get((model, key))

    def bind(self, model: str, key: str, identity: bytes) -> None:
        """Bind (or refresh) ``key``; clients choose keys freely, so the oldest binding goes past the bound."""
        self._bound[(model, key)] = identity
        self._bound.move_to_end((model, key))
        while len(self._bound) > self.max_keys:
            self._bound.popitem(last=False)

    def forget_worker(self, identity: bytes) -> None:
        """Drop every binding to a worker that is gone."""
        for k in [k for k, v in self._bound.items() if v == identity]:
            del self._bound[k]


def pick_worker(rec: RequestRecord, workers: dict[bytes, WorkerRecord], affinity: Affinity) -> WorkerRecord | None:
    """Affinity first (None while that replica is full); else the replica with most free slots, LRU on ties."""
    req = rec.request
    if req.affinity is not None:
        bound = workers.get(affinity.get(req.model, req.affinity) or b"")
        if bound is not None:
            return bound if bound.free > 0 else None
    return best_free(w for w in workers.values() if w.model == req.model)


def best_free(candidates: Iterable[WorkerRecord]) -> WorkerRecord | None:
    """The worker with the most free slots, least recently used on ties; None when none is free."""
    best: WorkerRecord | None = None
    for w in candidates:
        if w.free > 0 and (best is None or (w.free, -w.last_used_s) > (best.free, -best.last_used_s)):
            best = w
    return best
