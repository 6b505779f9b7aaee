"""The broker's `status` and `models` replies: views built from its state, pure.

A model's ``workers`` rows are the one view of its replicas: the registered
workers (``ready``, or ``retiring`` while they are stopped), and under the
supervisor (``mlx-fleet up``) its worker children that are not registered:
``starting``, ``restarting``, ``hung`` (declared dead for silence, process still
running) or ``gave_up``. Their restart counts and states come from the
supervisor's latest state message (:class:`broker.records.SupervisorView`),
the broker's one view of the supervisor's children. A sharded replica (a group of
ranks) is one row; ``ranks`` lists each rank's pid and host (from its rank 0's
``ready``, or from the supervisor while it is not registered).
"""

from __future__ import annotations

from typing import Any

from broker.lifecycle import ModelControl, ModelLife
from broker.records import ModelRecord, SupervisorView
from broker.state import BrokerState

CHILD_WAITING_STATES = ("starting", "restarting", "hung")  # an unregistered child the model waits for


def make_status(state: BrokerState, control: ModelControl | None = None) -> dict[str, Any]:
    """A JSON-like view for `status`: models and their workers, counters, losses, the supervisor."""
    now = state.clock.now()
    children = state.supervisor.workers() if state.supervisor else {}
    models = {name: model_status(state, name, m, children, control.lives.get(name) if control else None)
              for name, m in sorted(state.models.items())}
    r = state.router.settings
    return {
        "models": models, "accepting": state.accepting, "counters": dict(state.counters),
        "requests": len(state.requests), "recent_worker_losses": recent_losses(state, now),
        "supervisor": supervisor_status(state.supervisor, now),
        "routing": {"policy": r.policy, "min_match": r.min_match, "balance_abs": r.balance_abs,
                    "balance_rel": r.balance_rel,
                    "prefix_keys_dropped": state.router.prefixes.dropped},
    }


def model_status(state: BrokerState, name: str, m: ModelRecord, children: dict[str, dict[str, Any]],
                 life: ModelLife | None) -> dict[str, Any]:
    """One model's entry: queue, running, workers (registered and not), lifecycle state."""
    now = state.clock.now()
    workers = state.live_workers(name)
    rows = [
        {
            "worker_id": w.worker_id, "pid": w.pid, "host": w.host,
            "state": "retiring" if w.retiring else "ready", "capacity": w.capacity,
            "in_flight": len(w.running), "free": w.free, "max_in_flight": w.max_in_flight,
            "served": w.served, "last_seen_s": round(now - (w.expiry_s - state.liveness_s), 3),
            "step_elapsed_s": w.step_elapsed_s,
            "restarts": children.get(w.worker_id, {}).get("restarts", 0),
            "ranks": w.info.get("ranks", []), "info": w.info, "stats": w.stats,
            "prefixes": state.router.prefixes.view(w.identity), "recent": state.recent.summary([w.worker_id]),
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
            "step_elapsed_s": 0.0,
            "restarts": child.get("restarts", 0), "ranks": child.get("ranks", []), "info": {}, "stats": {},
            "prefixes": {"keys": 0, "reports": 0, "age_s": None}, "recent": state.recent.summary([wid]),
        })
    rows.sort(key=lambda r: r["worker_id"])
    on_demand = bool(life and life.on_demand)
    routed = state.router.counts.get(name)
    return {
        "state": model_state(m, life, rows), "queue_depth": len(m.queue), "clients_waiting": m.queue.waiting_clients(),
        "running": sum(len(w.running) for w in workers), "on_demand": on_demand,
        "idle_unload_s": life.idle_unload_s if life and on_demand else None, "workers": rows,
        "capacity": sum(w.capacity for w in workers if not w.retiring),
        "recent": state.recent.summary(r["worker_id"] for r in rows),
        "routed": dict(routed.reasons) if routed else {},
    }


def child_state(child: dict[str, Any], silent_pid: int | None) -> str:
    """How an unregistered worker child is doing, in one word."""
    if child.get("gave_up"):
        return "gave_up"
    if not child.get("alive"):
        return "restarting"
    if silent_pid is not None and silent_pid == child.get("pid"):
        return "hung"  # declared dead for silence, yet its process still runs
    return "starting"


def model_state(m: ModelRecord, life: ModelLife | None, rows: list[dict[str, Any]]) -> str:
    """ready, starting, cold (on-demand, no worker), no_workers or unloading."""
    if not m.accepting:
        return "unloading"
    if any(r["state"] == "ready" for r in rows):
        return "ready"
    if (life and life.starting) or any(r["state"] in CHILD_WAITING_STATES for r in rows):
        return "starting"
    return "cold" if life and life.on_demand else "no_workers"


def supervisor_status(view: SupervisorView | None, now_s: float) -> dict[str, Any]:
    """What the supervisor last said: connected, memory figures, its children and how old that is."""
    if view is None:
        return {"connected": False, "memory": {}}
    return {"connected": True, "memory": dict(view.memory), "children": view.children,
            "report_age_s": round(now_s - view.at_s, 3)}


def models_summary(models: dict[str, Any]) -> list[dict[str, Any]]:
    """The `models` reply from a status's models: ready workers only."""
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
