"""Unit tests for broker.lifecycle: load, unload with drain, on-demand models, on a fake clock.

The supervisor is played by hand: each ``Out`` to ``Dest.CONTROL`` is a call it must
answer with a ``control_reply`` or an ``error`` carrying the call's request_id.
"""

from __future__ import annotations

from typing import Any

import pytest

from actors.clock import FakeClock
from actors.control import Start, Stop, SupervisorState, SupervisorStateAck
from actors.protocol import (
    BAD_REQUEST, OVER_BUDGET, UNAVAILABLE, UNKNOWN_MODEL,
    ControlReply, Disconnect, Dispatch, Done, Error, Generate, Load, Message, Ready, Unload,
)
from broker.lifecycle import ModelControl
from broker.records import Dest, Out
from broker.state import BrokerState
from broker.status import make_status

pytestmark = pytest.mark.timeout(30)


def body(out: Out) -> dict[str, Any]:
    return out.body.to_map() if isinstance(out.body, Message) else dict(out.body)


class Harness:
    """A BrokerState and its ModelControl; records what clients, workers and the supervisor get."""

    def __init__(self, models: tuple[str, ...] = ("a",), *, on_demand: dict[str, float] | None = None,
                 supervised: bool = True, drain_timeout_s: float = 30.0) -> None:
        self.clock = FakeClock()
        # Liveness is not under test here: workers never go silent.
        self.state = BrokerState(self.clock, models=models, no_worker_timeout_s=600.0, heartbeat_interval_s=1000.0)
        self.ctl = ModelControl(self.state, self.clock, supervised=supervised, on_demand=on_demand or {},
                                drain_timeout_s=drain_timeout_s, call_timeout_s=10.0)
        self.clients: list[dict[str, Any]] = []
        self.calls: list[Message] = []
        self.dispatches: list[tuple[bytes, str]] = []

    def take(self, outs: list[Out]) -> list[Out]:
        for out in outs:
            if out.to is Dest.CLIENT:
                self.clients.append(body(out))
            elif out.to is Dest.CONTROL:
                assert isinstance(out.body, Message)
                self.calls.append(out.body)
            elif out.to is Dest.WORKER and isinstance(out.body, Dispatch):
                self.dispatches.append((out.identity, out.body.request.request_id))
        return outs

    def generate(self, rid: str, model: str = "a") -> list[Out]:
        outs = self.state.handle_generate(b"c", Generate(request_id=rid, model=model, prompt="hi"))
        return self.take(outs + self.ctl.after_generate(model))

    def ready(self, wid: str, model: str = "a", capacity: int = 1) -> bool:
        msg = Ready(worker_id=wid, model=model, capacity=capacity, pid=1, host="h")
        if not self.ctl.accept_ready(msg):
            return False
        self.take(self.state.handle_ready(wid.encode(), msg))
        return True

    def finish(self, rid: str) -> list[Out]:
        key = self.state.by_client[(b"c", rid)]
        worker = self.state.requests[key].worker
        assert worker is not None
        done = Done(request_id=key, finish_reason="stop")
        return self.take(self.state.handle_worker_message(worker, done, done.to_map()))

    def reply(self, call: Message, ok: bool = True, code: str = OVER_BUDGET) -> list[Out]:
        rid = getattr(call, "request_id")
        model = getattr(call, "model")
        answer: Message = ControlReply(call.TYPE, model, "fine", [], rid) if ok else Error(code, "nope", rid)
        return self.take(self.ctl.handle_control(answer))

    def tick(self, advance_s: float = 0.0) -> list[Out]:
        self.clock.advance(advance_s)
        return self.take(self.state.tick() + self.ctl.tick())

    def load(self, model: str = "b", rid: str = "l1", **kw: Any) -> list[Out]:
        return self.take(self.ctl.handle_load(b"admin", Load(model=model, source="demo", request_id=rid, **kw)))

    def unload(self, model: str = "a", rid: str = "u1") -> list[Out]:
        return self.take(self.ctl.handle_unload(b"admin", Unload(model=model, request_id=rid)))

    def last_client(self) -> dict[str, Any]:
        return self.clients[-1]

    def terminal(self, rid: str) -> dict[str, Any]:
        ends = [m for m in self.clients if m.get("request_id") == rid and m["type"] in ("done", "error")]
        assert len(ends) == 1, ends
        return ends[0]


# ---- load -----------------------------------------------------------------------------


def test_load_goes_to_the_supervisor_and_its_reply_to_the_client() -> None:
    h = Harness()
    assert h.load(replicas=2) and not h.clients
    (call,) = h.calls
    assert isinstance(call, Load) and (call.model, call.replicas) == ("b", 2)
    assert call.request_id != "l1"  # the broker's own key
    assert h.state.handle_generate(b"c", Generate(request_id="early", model="b", prompt="x"))[0].body.code == UNKNOWN_MODEL
    h.reply(call)
    assert h.last_client()["type"] == "control_reply" and h.last_client()["request_id"] == "l1"
    assert h.generate("r1", "b") == [] and len(h.state.models["b"].queue) == 1  # queues until a worker comes
    h.ready("b-0", "b")
    assert h.dispatches == [(b"b-0", h.state.by_client[(b"c", "r1")])]


@pytest.mark.parametrize(("fields", "code"), [
    ({"model": "a"}, BAD_REQUEST),  # already served
    ({"model": " b"}, BAD_REQUEST),
    ({"model": "x/y"}, BAD_REQUEST),
    ({"replicas": 65}, BAD_REQUEST),
    ({"idle_unload_s": 0.0}, BAD_REQUEST),
    ({"dtype": "int3"}, BAD_REQUEST),
])
def test_load_refusals(fields: dict[str, Any], code: str) -> None:
    h = Harness()
    assert h.load(**fields)[0].to is Dest.CLIENT and h.last_client()["code"] == code
    assert not h.calls


def test_load_without_a_supervisor_is_unavailable() -> None:
    h = Harness(supervised=False)
    h.load()
    assert h.last_client()["code"] == UNAVAILABLE and not h.calls


def test_a_second_load_of_the_same_name_waits_for_the_first() -> None:
    h = Harness()
    h.load(rid="l1")
    h.load(rid="l2")
    assert h.last_client()["code"] == BAD_REQUEST and len(h.calls) == 1


def test_supervisor_refusal_reaches_the_client_and_the_model_stays_unknown() -> None:
    h = Harness()
    h.load()
    h.reply(h.calls[0], ok=False, code=OVER_BUDGET)
    assert h.last_client() == {"type": "error", "code": OVER_BUDGET, "message": "nope", "request_id": "l1"}
    h.generate("r1", "b")
    assert h.terminal("r1")["code"] == UNKNOWN_MODEL


def test_an_unanswered_call_times_out() -> None:
    h = Harness()
    h.load()
    h.tick(9.0)
    assert not h.clients
    h.tick(1.5)
    assert h.last_client()["code"] == UNAVAILABLE and "did not answer" in h.last_client()["message"]


# ---- unload -----------------------------------------------------------------------------


def test_unload_drains_queued_and_running_requests_before_stopping() -> None:
    h = Harness()
    h.ready("a-0", capacity=1)
    h.generate("r1")
    h.generate("r2")  # queued behind r1
    h.unload()
    assert not h.calls and not any(m["type"] == "control_reply" for m in h.clients)
    h.generate("r3")
    assert h.terminal("r3")["code"] == UNKNOWN_MODEL  # new requests are refused at once
    h.finish("r1")
    assert h.dispatches[-1][1] == h.state.by_client[(b"c", "r2")]  # the queued one still runs
    h.tick(1.0)
    assert not h.calls
    h.finish("r2")
    h.tick()
    (stop,) = h.calls
    assert isinstance(stop, Stop) and stop.model == "a" and stop.forget
    assert h.state.workers[b"a-0"].retiring and h.state.workers[b"a-0"].free == 0
    h.reply(stop)
    assert h.last_client()["type"] == "control_reply" and h.last_client()["request_id"] == "u1"
    assert h.terminal("r1")["type"] == h.terminal("r2")["type"] == "done"
    # The worker leaves; the model's record goes; a retired worker cannot come back.
    h.take(h.state.handle_worker_message(b"a-0", Disconnect(worker_id="a-0"), {}))
    h.tick()
    assert "a" not in h.state.models
    assert h.ready("a-0") is False


def test_unload_past_the_drain_deadline_fails_what_is_queued() -> None:
    h = Harness(drain_timeout_s=5.0)
    h.ready("a-0", capacity=1)
    h.generate("r1")
    h.generate("r2")
    h.unload()
    h.tick(4.0)
    assert not h.calls
    h.tick(1.5)
    assert isinstance(h.calls[0], Stop)
    assert h.terminal("r2")["code"] == UNAVAILABLE
    # The running one still gets its worker's answer.
    h.finish("r1")
    assert h.terminal("r1")["type"] == "done"


def test_unload_refusals() -> None:
    h = Harness(models=("a", "b"))
    h.unload("zzz")
    assert h.last_client()["code"] == UNKNOWN_MODEL
    h.ready("a-0")
    h.generate("r1")
    h.unload("a", rid="u1")
    h.unload("a", rid="u2")
    assert h.last_client()["code"] == UNKNOWN_MODEL  # it is no longer served
    assert h.load("a", rid="l1") and h.last_client()["code"] == BAD_REQUEST  # not while unloading


def test_unload_without_a_supervisor_retires_and_answers_at_once() -> None:
    h = Harness(supervised=False)
    h.ready("a-0")
    h.unload()
    assert h.last_client()["type"] == "control_reply" and h.last_client()["workers"] == ["a-0"]
    assert h.state.workers[b"a-0"].retiring and not h.calls


def test_load_again_after_unload_while_the_old_worker_is_leaving() -> None:
    h = Harness()
    h.ready("a-0")
    h.unload()
    h.reply(h.calls[0])
    h.load("a", rid="l2")
    h.reply(h.calls[1])
    h.generate("r1")
    assert not h.dispatches  # the leaving worker gets nothing
    h.ready("a-0.1")
    assert h.dispatches[0][0] == b"a-0.1"


# ---- on demand ----------------------------------------------------------------------------


def test_on_demand_starts_at_the_first_request_and_stops_when_idle() -> None:
    h = Harness(models=("lazy",), on_demand={"lazy": 5.0})
    h.tick(100.0)
    assert not h.calls  # nothing starts without a request
    h.generate("r1", "lazy")
    h.generate("r2", "lazy")
    (start,) = h.calls
    assert isinstance(start, Start) and start.model == "lazy"
    h.reply(start)
    h.tick(1.0)
    assert len(h.calls) == 1  # no second start while it comes up
    h.ready("lazy-0", "lazy", capacity=4)
    assert len(h.dispatches) == 2
    h.finish("r1")
    h.tick(3.0)
    h.finish("r2")
    h.tick(4.9)
    assert len(h.calls) == 1
    h.tick(0.2)
    stop = h.calls[-1]
    assert isinstance(stop, Stop) and not stop.forget and h.state.workers[b"lazy-0"].retiring
    h.reply(stop)
    # A new request starts it again; the old process never takes it.
    h.generate("r3", "lazy")
    assert isinstance(h.calls[-1], Start) and len(h.dispatches) == 2
    h.ready("lazy-0.1", "lazy")
    assert h.dispatches[-1][0] == b"lazy-0.1"


def test_on_demand_start_refused_fails_the_waiting_requests() -> None:
    h = Harness(models=("lazy",), on_demand={"lazy": 5.0})
    h.generate("r1", "lazy")
    h.reply(h.calls[0], ok=False, code=OVER_BUDGET)
    assert h.terminal("r1")["code"] == OVER_BUDGET
    assert "could not start on-demand model" in h.terminal("r1")["message"]


def test_a_loaded_on_demand_model_starts_cold() -> None:
    h = Harness()
    h.load("lazy", on_demand=True, idle_unload_s=2.0)
    h.reply(h.calls[0])
    assert make_status(h.state, h.ctl)["models"]["lazy"]["state"] == "cold"
    h.generate("r1", "lazy")
    assert isinstance(h.calls[-1], Start)
    assert h.ctl.lives["lazy"].idle_unload_s == 2.0


# ---- the supervisor's state and status ------------------------------------------------------------


def supervisor_state(h: Harness, *workers: dict[str, Any], models: tuple[str, ...] = ("a",), broker_restarts: int = 0,
                     **fields: Any) -> list[Out]:
    """The supervisor's state message: worker children of model a (unless they say otherwise), and the broker."""
    children = [{"name": f"worker:{w['worker_id']}", "kind": "worker", "model": "a", "alive": True, "restarts": 0,
                 "gave_up": False, "exited_pids": [], **w} for w in workers]
    children.append({"name": "broker", "kind": "broker", "restarts": broker_restarts})
    msg = SupervisorState(children=children, models=fields.pop("model_specs", [{"name": m} for m in models]),
                          supervisor_pid=1, **fields)
    return h.take(h.ctl.handle_control(msg))


def test_state_syncs_the_configured_models_and_is_acked() -> None:
    h = Harness(models=("a", "gone"))
    outs = supervisor_state(h, model_specs=[{"name": "a"}, {"name": "z", "on_demand": True, "idle_unload_s": 9}])
    assert h.state.models["z"].configured and h.ctl.lives["z"].on_demand
    assert not h.state.models["gone"].configured
    (ack,) = [o.body for o in outs if o.to is Dest.CONTROL]
    assert isinstance(ack, SupervisorStateAck) and ack.registered == [] and ack.silent_workers == []
    h.ready("a-0")
    (ack,) = [o.body for o in supervisor_state(h) if o.to is Dest.CONTROL]
    assert ack.registered == ["a-0"]
    h.generate("r1", "gone")
    assert h.terminal("r1")["code"] == UNKNOWN_MODEL


def test_status_shows_state_restarts_and_unregistered_children() -> None:
    h = Harness(models=("a", "lazy"), on_demand={"lazy": 5.0})
    h.ready("a-0")
    supervisor_state(h, {"worker_id": "a-0", "restarts": 2, "pid": 7}, {"worker_id": "a-1", "pid": 8},
                     {"worker_id": "a-2", "alive": False, "restarts": 5, "gave_up": True, "pid": 9},
                     model_specs=[{"name": "a"}, {"name": "lazy", "on_demand": True}],
                     memory={"budget_bytes": 100, "loaded_bytes": 40})
    snap = make_status(h.state, h.ctl)
    a = snap["models"]["a"]
    assert a["state"] == "ready" and "starting" not in a  # one list of replicas
    assert [(w["worker_id"], w["state"], w["restarts"]) for w in a["workers"]] == [
        ("a-0", "ready", 2), ("a-1", "starting", 0), ("a-2", "gave_up", 5)]
    assert snap["models"]["lazy"]["state"] == "cold" and snap["models"]["lazy"]["on_demand"]
    assert snap["supervisor"]["memory"] == {"budget_bytes": 100, "loaded_bytes": 40}
    assert snap["supervisor"]["connected"] and {c["name"] for c in snap["supervisor"]["children"]} == {
        "worker:a-0", "worker:a-1", "worker:a-2", "broker"}
    h.unload("a")
    h.generate("r9", "a")
    assert make_status(h.state, h.ctl)["models"]["a"]["state"] == "unloading"


def test_a_model_waiting_for_its_children_is_starting_and_a_given_up_one_has_no_workers() -> None:
    h = Harness(models=("a",))
    supervisor_state(h, {"worker_id": "a-0", "pid": 8})
    assert make_status(h.state, h.ctl)["models"]["a"]["state"] == "starting"
    supervisor_state(h, {"worker_id": "a-0", "pid": 8, "alive": False, "gave_up": True, "restarts": 5})
    assert make_status(h.state, h.ctl)["models"]["a"]["state"] == "no_workers"


def test_before_any_state_the_supervisor_is_not_connected() -> None:
    h = Harness()
    assert make_status(h.state, h.ctl)["supervisor"] == {"connected": False, "memory": {}}


def test_a_given_up_worker_is_listed_once_and_the_table_shows_it() -> None:
    from broker.status import models_summary
    from mlx_fleet.cli_cluster import format_status

    h = Harness(models=("a",))
    h.ready("a-0")
    h.ready("a-1")
    h.state.worker_gone(b"a-1", "its process 1 exited (code 1)")
    supervisor_state(h, {"worker_id": "a-0", "pid": 1, "restarts": 3},
                     {"worker_id": "a-1", "pid": 8, "alive": False, "gave_up": True, "restarts": 2},
                     broker_restarts=1, memory={"budget_bytes": 100, "loaded_bytes": 40})
    snap = make_status(h.state, h.ctl)
    a = snap["models"]["a"]
    assert [(w["worker_id"], w["state"], w["restarts"]) for w in a["workers"]] == [("a-0", "ready", 3), ("a-1", "gave_up", 2)]
    assert a["state"] == "ready" and snap["supervisor"]["memory"] == {"budget_bytes": 100, "loaded_bytes": 40}
    assert models_summary(snap["models"]) == [{"name": "a", "workers_ready": 1, "queue_depth": 0, "capacity": 1}]

    snap["broker"] = {"pid": 42, "restarts": h.state.supervisor.restarts("broker")}
    snap["recent_worker_losses"] = [{**loss, "ago_s": 0.0} for loss in snap["recent_worker_losses"]]
    table = format_status(snap)
    assert table.splitlines()[0].startswith("broker pid 42, restarts 1, accepting")
    (row,) = [ln for ln in table.splitlines() if ln.split() and ln.split()[0] == "a-1"]  # listed once
    assert "gave_up" in row and row.split()[-3] == "2"  # restarts, then precision and BLAS
    assert "lost a-1 (pid 1)" in table and "memory: " in table
