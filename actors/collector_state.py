"""The collector's aggregated state: pure, no sockets, a clock.

:class:`CollectorState` folds validated events (see :mod:`actors.metrics`) into
histograms, counters and gauges, and answers readiness. The collector process
guards it with a lock; a scrape takes :meth:`CollectorState.snapshot`, a deep
copy, and renders it outside the lock.

Counters from the broker and the supervisor arrive as cumulative values, so a
dropped snapshot costs nothing and a restarted collector picks up where the
fleet is. Histograms and worker counters arrive as per-event increments.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from actors.clock import Clock
from actors.metrics import (
    BATCH_SIZE_BUCKETS, DECODE_PATHS, E2E_BUCKETS_S, ENGINE_PATHS, ITL_BUCKETS_S, KNOWN_ERROR_CODES,
    KNOWN_FINISH_REASONS, OTHER, PREFIX_BLOCK_BUCKETS, QUEUE_BUCKETS_S, REGISTERED_STATES, ROUTE_REASONS,
    TTFT_BUCKETS_S, WINDOW_WAIT_BUCKETS_S, WORKER_STATES, EventError, bucket_index, decode_event,
)

# Label cardinality caps: events that would add more series are dropped.
MAX_MODELS = 256
MAX_WORKERS = 1024
MAX_SOURCES = 1024
COLLECTOR_SOURCE = "collector"


@dataclass
class Histogram:
    """Bucket counts (non-cumulative, +Inf last), sum and count of one series."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.counts[bucket_index(self.bounds, value)] += 1
        self.sum += value

    def add_counts(self, counts: list[int], total: float) -> None:
        """Add observations already binned with the same bounds."""
        for i, n in enumerate(counts):
            self.counts[i] += n
        self.sum += total

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, cumulative count), ending with +Inf."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
        return out


def _model_histograms() -> dict[str, Histogram]:
    return {
        "ttft": Histogram(TTFT_BUCKETS_S), "itl": Histogram(ITL_BUCKETS_S), "e2e": Histogram(E2E_BUCKETS_S),
        "queue": Histogram(QUEUE_BUCKETS_S), "batch_size": Histogram(BATCH_SIZE_BUCKETS),
        "window_wait": Histogram(WINDOW_WAIT_BUCKETS_S),
    }


@dataclass
class ModelStats:
    """What the workers of one model reported."""

    histograms: dict[str, Histogram] = field(default_factory=_model_histograms)
    fast_path_admissions: int = 0
    paths: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENGINE_PATHS, 0))  # finished, by path
    path_steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DECODE_PATHS, 0))  # decode steps


@dataclass
class WorkerGauges:
    """Per-worker figures from its latest step event."""

    model: str
    admission_batch: int = 0
    window_s: float = 0.0
    busy_s: float = 0.0  # cumulative engine-step seconds seen by this collector
    mlx_s: float = 0.0  # cumulative busy seconds inside mlx-lm
    own_s: float = 0.0  # cumulative busy seconds in the worker's own code around it


@dataclass
class DropCount:
    """A sender's cumulative drops, folded into a total that survives its restarts."""

    last: int = 0
    total: int = 0

    def update(self, reported: int) -> None:
        """Fold in a sender's latest cumulative count (a smaller one means it restarted)."""
        self.total += reported - self.last if reported >= self.last else reported
        self.last = reported


@dataclass
class Snapshot:
    """A deep copy of everything a scrape renders."""

    models: list[str]
    stats: dict[str, ModelStats]
    workers: dict[str, WorkerGauges]
    broker: dict[str, Any] | None  # per-model map of the latest fresh broker event
    broker_counters: dict[str, Any]  # per model (every one, zeros until reported; "" for unnamed errors)
    worker_states: dict[str, dict[str, int]]
    restarts: dict[str, tuple[str, int]]  # worker -> (model, restarts)
    drops: dict[tuple[str, str], int]  # (source, reason) -> events dropped


class CollectorState:
    """Aggregates metric events for one fleet."""

    def __init__(self, clock: Clock, *, models: list[str] | tuple[str, ...] = (), broker_stale_s: float = 5.0) -> None:
        self.clock = clock
        self.configured = list(models)
        self.broker_stale_s = broker_stale_s
        self.stats: dict[str, ModelStats] = {name: ModelStats() for name in self.configured}
        self.workers: dict[str, WorkerGauges] = {}
        self.broker_models: dict[str, Any] | None = None
        self.broker_seen_s: float | None = None
        self.supervised: list[dict[str, Any]] = []
        self.drops: dict[str, DropCount] = {}
        self.malformed = 0
        self.over_limit = 0
        self.received = 0

    # ---- input -----------------------------------------------------------------------

    def apply_frames(self, frames: list[bytes]) -> bool:
        """Decode and apply one event; a malformed one is counted and dropped."""
        try:
            event = decode_event(frames)
        except EventError:
            self.malformed += 1
            return False
        return self.apply(event)

    def apply(self, event: dict[str, Any]) -> bool:
        """Apply one validated event; False when it was dropped (label limits)."""
        source = event["source"]
        if source not in self.drops and len(self.drops) >= MAX_SOURCES:
            self.over_limit += 1
            return False
        handler = {"step": self._apply_step, "request": self._apply_request,
                   "broker": self._apply_broker, "supervisor": self._apply_supervisor}[event["type"]]
        if not handler(event):
            self.over_limit += 1
            return False
        self.drops.setdefault(source, DropCount()).update(event["dropped"])
        self.received += 1
        return True

    def _model(self, name: str) -> ModelStats | None:
        stats = self.stats.get(name)
        if stats is None and len(self.stats) < MAX_MODELS:
            stats = self.stats[name] = ModelStats()
        return stats

    def _worker(self, worker: str, model: str) -> WorkerGauges | None:
        gauges = self.workers.get(worker)
        if gauges is None and len(self.workers) < MAX_WORKERS:
            gauges = self.workers[worker] = WorkerGauges(model)
        return gauges

    def _apply_step(self, ev: dict[str, Any]) -> bool:
        stats, gauges = self._model(ev["model"]), self._worker(ev["worker"], ev["model"])
        if stats is None or gauges is None:
            return False
        h = stats.histograms
        for n in ev["batch_sizes"]:
            h["batch_size"].observe(n)
        for wait_s in ev["window_wait_s"]:
            h["window_wait"].observe(wait_s)
        stats.fast_path_admissions += ev["fast_path_admissions"]
        _add_counts(stats.paths, ev.get("paths", {}))
        _add_counts(stats.path_steps, ev.get("path_steps", {}))
        gauges.mlx_s += ev.get("mlx_s", 0.0)
        gauges.own_s += ev.get("own_s", 0.0)
        gauges.model = ev["model"]
        gauges.admission_batch = ev["admission_batch"]
        gauges.window_s = ev["window_s"]
        gauges.busy_s += ev["busy_s"]
        return True

    def _apply_request(self, ev: dict[str, Any]) -> bool:
        stats = self._model(ev["model"])
        if stats is None:
            return False
        h = stats.histograms
        if "queue_s" in ev:
            h["queue"].observe(ev["queue_s"])
        if "ttft_s" in ev:
            h["ttft"].observe(ev["ttft_s"])
        h["e2e"].observe(ev["e2e_s"])
        h["itl"].add_counts(ev["itl_counts"], ev["itl_sum_s"])
        return True

    def _apply_broker(self, ev: dict[str, Any]) -> bool:
        models = ev["models"]
        if len(models) > MAX_MODELS:
            return False
        for name in models:
            if name:  # "" holds errors no model can be named for
                self._model(name)
        self.broker_models = models
        self.broker_seen_s = self.clock.now()
        return True

    def _apply_supervisor(self, ev: dict[str, Any]) -> bool:
        if len(ev["workers"]) > MAX_WORKERS:
            return False
        self.supervised = ev["workers"]
        return True

    # ---- derived views -------------------------------------------------------------------

    def broker_fresh(self) -> bool:
        """True when a broker event arrived within ``broker_stale_s``."""
        return self.broker_seen_s is not None and self.clock.now() - self.broker_seen_s <= self.broker_stale_s

    def model_names(self) -> list[str]:
        """Configured models first, then any others seen, in order."""
        return self.configured + sorted(n for n in self.stats if n not in self.configured)

    def worker_states(self) -> dict[str, dict[str, int]]:
        """Per model, workers by state: registered ones from the broker, the rest from the supervisor."""
        out = {name: dict.fromkeys(WORKER_STATES, 0) for name in self.model_names()}
        registered: set[str] = set()
        if self.broker_fresh() and self.broker_models is not None:
            for name, m in self.broker_models.items():
                if name not in out:
                    continue
                for worker, state in m["workers"].items():
                    out[name][state] += 1
                    registered.add(worker)
        for w in self.supervised:
            if w["model"] not in out:
                continue
            if not w["alive"]:
                out[w["model"]]["down"] += 1
            elif w["worker"] not in registered:
                out[w["model"]]["starting"] += 1
        return out

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, JSON body): ready when every configured model has a registered worker."""
        states = self.worker_states()
        ready_counts = {name: sum(states.get(name, {}).get(s, 0) for s in REGISTERED_STATES)
                        for name in self.configured}
        missing = [name for name, n in ready_counts.items() if n < 1]
        body: dict[str, Any] = {"ready": not missing, "missing": missing,
                                "models": {name: {"workers_ready": n} for name, n in ready_counts.items()}}
        if self.broker_seen_s is None:
            body["reason"] = "no broker report yet"
        elif not self.broker_fresh():
            body["reason"] = f"no broker report for more than {self.broker_stale_s:g}s"
        elif missing:
            body["reason"] = "no ready worker for: " + ", ".join(missing)
        return not missing, body

    def snapshot(self) -> Snapshot:
        """A deep copy of the state a scrape renders (call under the lock)."""
        reported = self.broker_models or {}
        counters: dict[str, Any] = {}
        for name in self.model_names() + ([""] if "" in reported else []):
            m = reported.get(name, {})
            blocks = m.get("prefix_blocks")
            counters[name] = {
                "requests": _relabel(m.get("requests", {}), KNOWN_FINISH_REASONS),
                "errors": _relabel(m.get("errors", {}), KNOWN_ERROR_CODES),
                "prompt_tokens": m.get("prompt_tokens", 0), "generation_tokens": m.get("generation_tokens", 0),
                "routed": _relabel(m.get("routed", {}), ROUTE_REASONS),
                "prefix_blocks": Histogram(PREFIX_BLOCK_BUCKETS, list(blocks) if blocks else [],
                                           float(m.get("prefix_blocks_sum", 0))),
            }
        gauges = None
        if self.broker_fresh() and self.broker_models is not None:
            gauges = {name: {"queue_depth": m["queue_depth"], "running": m["running"]}
                      for name, m in self.broker_models.items()}
        drops = {(src, "send_queue_full"): d.total for src, d in self.drops.items()}
        drops[(COLLECTOR_SOURCE, "malformed")] = self.malformed
        drops[(COLLECTOR_SOURCE, "label_limit")] = self.over_limit
        restarts = {w["worker"]: (w["model"], w["restarts"]) for w in self.supervised}
        return Snapshot(
            models=self.model_names(), stats=copy.deepcopy(self.stats), workers=copy.deepcopy(self.workers),
            broker=gauges, broker_counters=counters, worker_states=self.worker_states(),
            restarts=restarts, drops=drops,
        )


def _add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    """Add per-label increments; a label outside the known ones (``into``'s keys) goes under 'other'."""
    for key, n in counts.items():
        label = key if key in into else OTHER
        into[label] = into.get(label, 0) + n


def _relabel(counts: dict[str, int], known: tuple[str, ...]) -> dict[str, int]:
    """Counts keyed by the known label values (all present), anything else summed into 'other'."""
    out = dict.fromkeys(known, 0)
    for key, n in counts.items():
        label = key if key in out else OTHER
        out[label] = out.get(label, 0) + n
    return out
