"""Which worker takes a request: affinity first, then the replica holding its longest cached prefix,
unless the replicas' loads are out of balance; else the least-loaded replica.

Pure helpers of :class:`broker.state.BrokerState`; no sockets. The rungs, in order, each with the
reason it is counted under (``ROUTE_REASONS``):

1. ``affinity``: a request with an ``affinity`` key goes to the replica the key is bound to while
   that replica lives (None, so it waits, while that replica is full); the key binds on first use.
2. ``imbalance``: with ``cache_aware`` routing, when the replicas' loads (requests running on
   each) differ by more than ``balance_abs`` and the largest is more than ``balance_rel`` times
   the smallest, the least-loaded replica takes it, whatever it holds (SGLang's router guards
   its cache-aware policy the same way).
3. ``prefix``: the replica with a free slot whose prompt cache holds the longest prefix of the
   request, by the prefix keys its worker reported (:mod:`broker.prefix_index`,
   :mod:`actors.prefix_keys`), when that is at least ``min_match`` of the request's blocks; ties go
   to the least loaded. Below that share (as SGLang's cache threshold) the request mostly needs a
   prefill anyway, and a shared beginning alone (a system prompt) would pull every new
   conversation onto the first replica that served one.
4. ``least_loaded``: no replica holds any of it (or ``least_loaded`` routing): the replica with
   the most free slots, the least recently used on ties.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from actors.clock import Clock
from actors.config import FleetConfig
from actors.metrics import PREFIX_BLOCK_BUCKETS, ROUTE_REASONS, bucket_index
from actors.prefix_keys import prompt_keys
from broker.prefix_index import PrefixIndex
from broker.records import RequestRecord, WorkerRecord

CACHE_AWARE, LEAST_LOADED = "cache_aware", "least_loaded"


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


@dataclass(frozen=True)
class RoutingSettings:
    """How the broker picks a replica (FleetConfig's ``routing`` settings)."""

    policy: str = CACHE_AWARE  # cache_aware | least_loaded
    balance_abs: int = 8  # requests running: the gap between the busiest and the idlest replica ...
    balance_rel: float = 1.5  # ... and their ratio, both past which loads count as out of balance
    min_match: float = 0.5  # share of a request's prefix blocks a replica must hold to be chosen for them

    @classmethod
    def of(cls, cfg: FleetConfig) -> "RoutingSettings":
        """The routing settings of a fleet's config."""
        return cls(cfg.routing, cfg.routing_balance_abs, cfg.routing_balance_rel, cfg.routing_min_match)


@dataclass(frozen=True)
class Route:
    """Where a request goes, why (one of ROUTE_REASONS), and how many prefix blocks that replica holds."""

    worker: WorkerRecord
    reason: str
    matched_blocks: int = 0


@dataclass
class RouteCounts:
    """Requests routed per reason, and the matched prefix lengths (blocks) of those routed by prefix."""

    reasons: Counter[str]
    blocks: list[int]  # bucket counts over PREFIX_BLOCK_BUCKETS, +Inf last
    blocks_sum: int = 0

    @classmethod
    def empty(cls) -> "RouteCounts":
        """Nothing routed yet."""
        return cls(Counter(dict.fromkeys(ROUTE_REASONS, 0)), [0] * (len(PREFIX_BLOCK_BUCKETS) + 1))


class Router:
    """Affinity bindings, the prefix index, the routing rungs and what they decided."""

    def __init__(self, clock: Clock, settings: RoutingSettings | None = None, *, max_affinity_keys: int = 65_536) -> None:
        self.settings = settings or RoutingSettings()
        self.affinity = Affinity(max_affinity_keys)
        self.prefixes = PrefixIndex(clock)
        self.counts: dict[str, RouteCounts] = {}

    def pick(self, rec: RequestRecord, workers: dict[bytes, WorkerRecord]) -> Route | None:
        """The route for ``rec`` now, or None when it must wait (no free slot, or its affinity replica is full)."""
        req = rec.request
        if req.affinity is not None:
            bound = workers.get(self.affinity.get(req.model, req.affinity) or b"")
            if bound is not None:
                return Route(bound, "affinity") if bound.free > 0 else None
        replicas = [w for w in workers.values() if w.model == req.model and not w.retiring]
        least = best_free(replicas)
        if least is None:
            return None
        if self.settings.policy != CACHE_AWARE or len(replicas) < 2:
            return Route(least, LEAST_LOADED)
        if self.out_of_balance([w.capacity - w.free for w in replicas]):  # slots taken (n > 1 takes n)
            return Route(least, "imbalance")
        if rec.prefix_keys is None:
            rec.prefix_keys = prompt_keys(req.prompt, req.messages, req.prompt_tokens)
        best, blocks = least, 0
        for w in replicas:
            if w.free <= 0:
                continue
            n = self.prefixes.matched(w.identity, rec.prefix_keys)
            if n > blocks or (n == blocks and n > 0 and (w.free, -w.last_used_s) > (best.free, -best.last_used_s)):
                best, blocks = w, n
        enough = blocks > 0 and blocks >= self.settings.min_match * len(rec.prefix_keys)
        return Route(best, "prefix", blocks) if enough else Route(least, LEAST_LOADED)

    def out_of_balance(self, loads: list[int]) -> bool:
        """SGLang's guard: the busiest replica runs more than ``balance_abs`` requests over the idlest, and
        more than ``balance_rel`` times as many."""
        hi, lo = max(loads), min(loads)
        return hi - lo > self.settings.balance_abs and hi > self.settings.balance_rel * lo

    def routed(self, rec: RequestRecord, route: Route) -> None:
        """``rec`` was dispatched along ``route``: bind its affinity key on first use, count the decision."""
        req = rec.request
        if req.affinity is not None:
            self.affinity.bind(req.model, req.affinity, route.worker.identity)
        counts = self.counts.setdefault(req.model, RouteCounts.empty())
        counts.reasons[route.reason] += 1
        if route.reason == "prefix":
            counts.blocks[bucket_index(PREFIX_BLOCK_BUCKETS, route.matched_blocks)] += 1
            counts.blocks_sum += route.matched_blocks

    def forget_worker(self, identity: bytes) -> None:
        """A worker is gone or registered again: its bindings and what its cache held go."""
        self.affinity.forget_worker(identity)
        self.prefixes.forget(identity)


def best_free(candidates: Iterable[WorkerRecord]) -> WorkerRecord | None:
    """The worker with the most free slots, least recently used on ties; None when none is free."""
    best: WorkerRecord | None = None
    for w in candidates:
        if w.free > 0 and (best is None or (w.free, -w.last_used_s) > (best.free, -best.last_used_s)):
            best = w
    return best
