"""The broker's side of metrics: reply counts and the periodic ``broker`` event.

The broker sends one snapshot a second rather than an event per change: it is
cheaper under load, and its counters are cumulative, so a dropped snapshot or a
restarted collector loses nothing. See :mod:`actors.metrics` for the schema.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.state import BrokerState, WorkerRecord


class ReplyCounts:
    """Terminal replies sent to clients, per model. Model "" when the request named no served model."""

    def __init__(self) -> None:
        self.finished: Counter[tuple[str, str]] = Counter()  # (model, finish_reason)
        self.failed: Counter[tuple[str, str]] = Counter()  # (model, error code)
        self.prompt_tokens: Counter[str] = Counter()  # per model, from `done` usage
        self.generation_tokens: Counter[str] = Counter()

    def count(self, model: str, data: dict[str, Any]) -> None:
        """Count one terminal reply (a ``done`` or ``error`` map)."""
        kind = data.get("type")
        if kind == "done":
            self.finished[(model, str(data.get("finish_reason")))] += 1
            usage = data.get("usage")
            if isinstance(usage, dict):
                self.prompt_tokens[model] += _token_count(usage.get("prompt_tokens"))
                self.generation_tokens[model] += _token_count(usage.get("completion_tokens"))
        elif kind == "error":
            self.failed[(model, str(data.get("code")))] += 1


def _token_count(value: Any) -> int:
    """A usage figure from a worker, trusted only when it is a plausible count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31 else 0


def worker_state(w: WorkerRecord) -> str:
    """idle (nothing running), busy (running, slots left) or full (no free slot)."""
    if w.free <= 0:
        return "full"
    return "busy" if w.running else "idle"


def make_broker_event(state: BrokerState) -> dict[str, Any]:
    """The fields of one ``broker`` event: per-model gauges, worker states and cumulative counts."""
    replies = state.replies
    models: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        if name not in models:
            models[name] = {"queue_depth": 0, "running": 0, "workers": {}, "requests": {}, "errors": {},
                            "prompt_tokens": replies.prompt_tokens[name],
                            "generation_tokens": replies.generation_tokens[name]}
        return models[name]

    for name, m in state.models.items():
        entry(name)["queue_depth"] = len(m.queue)
    for w in state.workers.values():
        e = entry(w.model)
        e["running"] += len(w.running)
        e["workers"][w.worker_id] = worker_state(w)
    for (name, reason), n in replies.finished.items():
        entry(name)["requests"][reason] = n
    for (name, code), n in replies.failed.items():
        entry(name)["errors"][code] = n
    return {"models": models}
