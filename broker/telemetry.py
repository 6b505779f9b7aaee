"""The broker's side of metrics: the periodic ``broker`` event.

The broker sends one snapshot a second rather than an event per change: it is
cheaper under load, and its counters (``BrokerState.replies``) are cumulative,
so a dropped snapshot or a restarted collector loses nothing. See
:mod:`actors.metrics` for the schema.
"""

from __future__ import annotations

from typing import Any

from broker.records import WorkerRecord
from broker.state import BrokerState


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
    for name, routed in state.router.counts.items():
        e = entry(name)
        e["routed"] = dict(routed.reasons)
        e["prefix_blocks"], e["prefix_blocks_sum"] = list(routed.blocks), routed.blocks_sum
    return {"models": models}
