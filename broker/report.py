"""What the broker reports: the `status` snapshot, merged with the supervisor's view.

The supervisor (``mlx-fleet up``) sends ``fleet_info`` over the worker endpoint:
one map per child process with its pid, liveness and restart count. The broker
keeps the latest copy and folds it into `status`: restarts per worker, the
broker's own restarts, and rows for configured workers that are not registered
(starting, restarting, or given up on). Everything here is pure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.state import BrokerState

MAX_CHILDREN = 1024
MAX_EXITED_PIDS = 8

# Field -> accepted types of one child entry; anything else is dropped.
_CHILD_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "worker_id": (str,), "model": (str,), "pid": (int,),
    "alive": (bool,), "restarts": (int,), "gave_up": (bool,), "last_exit": (int,),
    "exited_pids": (list,), "next_start_in_s": (float, int),
}


def clean_children(raw: list[Any]) -> list[dict[str, Any]]:
    """Keep well-typed fields of at most MAX_CHILDREN entries (the sender is trusted, not infallible)."""
    out: list[dict[str, Any]] = []
    for entry in raw[:MAX_CHILDREN]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        child: dict[str, Any] = {}
        for key, types in _CHILD_FIELDS.items():
            value = entry.get(key)
            if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
                child[key] = value
        child["exited_pids"] = [p for p in child.get("exited_pids", [])[:MAX_EXITED_PIDS]
                                if isinstance(p, int) and not isinstance(p, bool)]
        out.append(child)
    return out


def worker_children(state: BrokerState) -> dict[str, dict[str, Any]]:
    """The supervisor's worker children by worker_id."""
    return {c["worker_id"]: c for c in state.fleet_children if c.get("kind") == "worker" and "worker_id" in c}


def child_state(child: dict[str, Any], silent_pid: int | None) -> str:
    """How an unregistered worker child is doing, in one word."""
    if child.get("gave_up"):
        return "gave_up"
    if not child.get("alive"):
        return "restarting"
    if silent_pid is not None and silent_pid == child.get("pid"):
        return "hung"  # declared dead for silence, yet its process still runs
    return "starting"


def make_snapshot(state: BrokerState) -> dict[str, Any]:
    """A JSON-like view for `status`: models, workers (with restarts), counters."""
    now = state.clock.now()
    children = worker_children(state)
    models: dict[str, Any] = {}
    for name, m in sorted(state.models.items()):
        workers = state.live_workers(name)
        rows = [
            {
                "worker_id": w.worker_id, "pid": w.pid, "host": w.host,
                "state": "retiring" if w.retiring else "ready", "capacity": w.capacity,
                "in_flight": len(w.running), "free": w.free, "max_in_flight": w.max_in_flight,
                "served": w.served, "last_seen_s": round(now - (w.expiry_s - state.liveness_s), 3),
                "restarts": children.get(w.worker_id, {}).get("restarts", 0),
                "info": w.info, "stats": w.stats,
            }
            for w in workers
        ]
        registered = {w.worker_id for w in workers}
        for wid, child in children.items():
            if child.get("model") != name or wid in registered:
                continue
            silent = state.silent.get(wid)
            rows.append({
                "worker_id": wid, "pid": child.get("pid") or 0, "host": silent.host if silent else "-",
                "state": child_state(child, silent.pid if silent else None),
                "capacity": 0, "in_flight": 0, "free": 0, "max_in_flight": 0, "served": 0, "last_seen_s": None,
                "restarts": child.get("restarts", 0), "info": {}, "stats": {},
            })
        models[name] = {
            "queue_depth": len(m.queue),
            "running": sum(len(w.running) for w in workers),
            "workers": sorted(rows, key=lambda r: r["worker_id"]),
        }
    return {
        "models": models, "accepting": state.accepting, "counters": dict(state.counters),
        "requests": len(state.requests), "recent_worker_losses": recent_losses(state, now),
    }


def models_summary(models: dict[str, Any]) -> list[dict[str, Any]]:
    """The `models` reply from a snapshot's models: ready workers only.

    A snapshot's ``workers`` also lists retiring workers and the supervisor's
    children that are not registered (starting, restarting, hung, gave_up).
    """
    out = []
    for name, m in models.items():
        ready = [w for w in m["workers"] if w["state"] == "ready"]
        out.append({"name": name, "workers_ready": len(ready), "queue_depth": m["queue_depth"],
                    "capacity": sum(w["capacity"] for w in ready)})
    return out


def recent_losses(state: BrokerState, now_s: float) -> list[dict[str, Any]]:
    """The last few workers declared lost, newest last, with how long ago."""
    return [{k: v for k, v in {**loss, "ago_s": round(now_s - loss["at_s"], 3)}.items() if k != "at_s"}
            for loss in state.losses]


def supervisor_view(state: BrokerState) -> dict[str, Any] | None:
    """The supervisor's latest report for `status`, or None if none came."""
    if state.fleet_info_at_s is None:
        return None
    return {"children": state.fleet_children, "report_age_s": round(state.clock.now() - state.fleet_info_at_s, 3)}


def child_restarts(state: BrokerState, kind: str) -> int:
    """Restarts of the first child of ``kind`` (e.g. the broker itself)."""
    return next((c.get("restarts", 0) for c in state.fleet_children if c.get("kind") == kind), 0)


def silent_report(state: BrokerState) -> list[dict[str, Any]]:
    """Workers declared dead for silence and not registered since (for the supervisor)."""
    now = state.clock.now()
    return [{"worker_id": s.worker_id, "pid": s.pid, "silent_for_s": round(now - s.since_s, 3)}
            for s in state.silent.values()]
