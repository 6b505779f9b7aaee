"""Unit tests for fault tolerance: the fault switch, broker liveness and requeue, hung workers.

Pure objects on a fake clock; no sockets, no processes, no sleeping.
"""

from __future__ import annotations

from typing import Any

import pytest

from actors.clock import FakeClock
from actors.control import SupervisorState, SupervisorStateAck
from actors.protocol import Chunk, Disconnect, Generate, Heartbeat, Ready
from broker.records import Dest, Out
from broker.state import BrokerState
from broker.status import make_status
from workers.faults import FaultInjector, FaultPlan, FaultSpecError, load_faults, parse_faults

pytestmark = pytest.mark.timeout(10)

# ---- the fault switch ------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("", FaultPlan()),
    ("hang_after_dispatches=3", FaultPlan(hang_after_dispatches=3)),
    ("worker=demo-1, exit_after_dispatches=2, exit_code=9", FaultPlan(worker="demo-1", exit_after_dispatches=2, exit_code=9)),
    ("hang_after_dispatches=1,hang_s=0.5", FaultPlan(hang_after_dispatches=1, hang_s=0.5)),
    ("stall_step_s=10", FaultPlan(stall_step_s=10.0)),
    ("stall_step_s=2.5,stall_at_step=3", FaultPlan(stall_step_s=2.5, stall_at_step=3)),
])
def test_parse_faults(text: str, want: FaultPlan) -> None:
    assert parse_faults(text) == want


@pytest.mark.parametrize("text", ["explode=1", "hang_after_dispatches", "hang_after_dispatches=x", "hang_s=",
                                  "stall_step_s=long", "stall_at_step=1.5"])
def test_parse_faults_rejects(text: str) -> None:
    with pytest.raises(FaultSpecError):
        parse_faults(text)


@pytest.mark.parametrize("env, worker, active", [
    ({"MLX_FLEET_FAULTS": "hang_after_dispatches=1"}, "demo-0", False),  # not enabled: production
    ({"MLX_FLEET_ENABLE_FAULTS": "0", "MLX_FLEET_FAULTS": "hang_after_dispatches=1"}, "demo-0", False),
    ({"MLX_FLEET_ENABLE_FAULTS": "1", "MLX_FLEET_FAULTS": "hang_after_dispatches=1"}, "demo-0", True),
    ({"MLX_FLEET_ENABLE_FAULTS": "1", "MLX_FLEET_FAULTS": "worker=demo-1,hang_after_dispatches=1"}, "demo-0", False),
    ({"MLX_FLEET_ENABLE_FAULTS": "1", "MLX_FLEET_FAULTS": "worker=demo-1,hang_after_dispatches=1"}, "demo-1", True),
    ({"MLX_FLEET_ENABLE_FAULTS": "1"}, "demo-0", False),
])
def test_faults_only_when_enabled_and_targeted(env: dict[str, str], worker: str, active: bool) -> None:
    assert (load_faults(worker, env) is not None) == active


def test_injector_exits_and_hangs_at_the_planned_dispatch() -> None:
    exits: list[int] = []
    inj = FaultInjector(FaultPlan(exit_after_dispatches=2, exit_code=7), keep_running=lambda: True,
                        exit_process=exits.append)
    inj.on_dispatch()
    assert exits == []
    inj.on_dispatch()
    assert exits == [7]

    running = [True]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        if len(slept) == 5:
            running[0] = False  # SIGTERM arrives

    hang = FaultInjector(FaultPlan(hang_after_dispatches=1), keep_running=lambda: running[0], sleep=sleep)
    hang.on_dispatch()
    assert hang.hangs == 1 and len(slept) == 5
    hang.on_dispatch()  # only the planned dispatch hangs
    assert hang.hangs == 1


def test_injector_stalls_the_planned_step_only() -> None:
    slept: list[float] = []
    inj = FaultInjector(FaultPlan(stall_step_s=0.2, stall_at_step=2), keep_running=lambda: True,
                        sleep=slept.append)
    inj.on_step()
    assert slept == []
    inj.on_step()  # the planned step: blocks (in 0.05 s naps) until its time is up
    assert slept and all(s == 0.05 for s in slept)
    count = len(slept)
    inj.on_step()
    assert len(slept) == count


# ---- broker liveness and requeue ---------------------------------------------------------------

W0, W1, C = b"w0", b"w1", b"client"


def make_state(**kw: Any) -> tuple[BrokerState, FakeClock]:
    clock = FakeClock()
    state = BrokerState(clock, models=["m"], heartbeat_interval_s=1.0, heartbeat_liveness=3, **kw)
    return state, clock


def ready(state: BrokerState, ident: bytes, capacity: int = 2, pid: int = 100) -> list[Out]:
    return state.handle_ready(ident, Ready(ident.decode(), "m", capacity, pid, "host"))


def gen(state: BrokerState, rid: str, **kw: Any) -> list[Out]:
    return state.handle_generate(C, Generate(request_id=rid, model="m", prompt="hi", **kw))


def to_client(outs: list[Out]) -> list[dict[str, Any]]:
    return [o.body if isinstance(o.body, dict) else o.body.to_map() for o in outs if o.to is Dest.CLIENT]


def dispatched(outs: list[Out]) -> dict[str, bytes]:
    """request key -> worker identity for every dispatch in ``outs``."""
    return {o.body.request.request_id: o.identity for o in outs if o.to is Dest.WORKER and o.body.TYPE == "dispatch"}


def test_silent_worker_is_lost_after_liveness_and_its_requests_follow_the_rules() -> None:
    state, clock = make_state()
    ready(state, W0)
    sent = dispatched(gen(state, "streamed") + gen(state, "fresh"))
    assert set(sent.values()) == {W0}
    key_streamed = next(k for k in sent if state.requests[k].request.request_id == "streamed")
    state.handle_worker_message(W0, Chunk(key_streamed, "x", [1]), {"type": "chunk", "request_id": key_streamed})
    clock.advance(2.9)
    assert state.tick() == [] and W0 in state.workers
    clock.advance(0.2)
    outs = state.tick()
    assert W0 not in state.workers and state.silent["w0"].pid == 100
    (err,) = to_client(outs)
    assert err["request_id"] == "streamed" and err["code"] == "worker_lost"
    sent = dispatched(ready(state, W1))  # the unstarted one goes to the next live replica
    assert [state.requests[k].request.request_id for k in sent] == ["fresh"]
    ready(state, W0, pid=200)
    assert "w0" not in state.silent


def test_a_cancelled_request_is_not_run_again_when_its_worker_dies() -> None:
    state, clock = make_state()
    ready(state, W0)
    ready(state, W1)
    gen(state, "r")
    state.handle_cancel(C, "r")
    victim = next(w.identity for w in state.workers.values() if w.running)
    outs = state.worker_gone(victim, "killed")
    (done,) = to_client(outs)
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert not state.requests and not any(w.running for w in state.workers.values())


def test_requeue_happens_once() -> None:
    state, clock = make_state()
    ready(state, W0)
    gen(state, "r")
    ready(state, W1)
    assert to_client(state.worker_gone(W0, "killed")) == []  # requeued to w1
    (err,) = to_client(state.worker_gone(W1, "killed"))
    assert err["code"] == "worker_lost" and "already requeued 1x" in err["message"]


def test_unknown_worker_is_asked_to_register_once_per_interval() -> None:
    state, clock = make_state()
    burst = [state.handle_worker_message(W0, Chunk("b1", "x", [1]), {"type": "chunk"}) for _ in range(5)]
    assert [len(b) for b in burst] == [1, 0, 0, 0, 0]
    assert isinstance(burst[0][0].body, Disconnect)
    clock.advance(1.0)
    assert len(state.handle_worker_message(W0, Heartbeat("w0"), {"type": "heartbeat"})) == 1
    assert state.handle_worker_message(W0, Disconnect("w0"), {"type": "disconnect"}) == []


def report(state: BrokerState, **child: Any) -> list[Out]:
    """The supervisor's state message with one worker child, w0."""
    entry = {"name": "worker:w0", "kind": "worker", "worker_id": "w0", "model": "m", "alive": True,
             "restarts": 0, "gave_up": False, "exited_pids": [], **child}
    children = [entry, {"name": "broker", "kind": "broker", "restarts": 3}]
    return state.handle_supervisor_state(SupervisorState(children=children, models=[{"name": "m"}]))


def test_supervisor_state_drops_a_worker_whose_process_exited_and_acks() -> None:
    state, clock = make_state()
    ready(state, W0, pid=100)
    gen(state, "r")
    outs = report(state, pid=100)
    assert W0 in state.workers  # alive, same pid
    ack = [o for o in outs if o.to is Dest.CONTROL]
    assert isinstance(ack[0].body, SupervisorStateAck) and ack[0].body.silent_workers == []
    assert ack[0].body.registered == ["w0"]
    assert W0 in state.workers
    report(state, pid=101, alive=True, restarts=1, exited_pids=[100])
    assert W0 not in state.workers and len(state.models["m"].queue) == 1  # requeued at once, no liveness wait
    snap = make_status(state)
    (row,) = snap["models"]["m"]["workers"]
    assert row["state"] == "starting" and row["restarts"] == 1 and row["pid"] == 101
    ready(state, W0, pid=101)
    (row,) = make_status(state)["models"]["m"]["workers"]
    assert row["state"] == "ready" and row["restarts"] == 1


def test_a_stale_report_never_drops_a_fresh_registration() -> None:
    state, clock = make_state()
    ready(state, W0, pid=101)
    report(state, pid=100, alive=True)  # queued before the restart, delivered after it
    assert W0 in state.workers


def test_ack_names_silent_workers_and_status_shows_hung_and_gave_up() -> None:
    state, clock = make_state()
    ready(state, W0, pid=100)
    clock.advance(3.5)
    state.tick()
    clock.advance(2.0)
    (ack,) = [o.body for o in report(state, pid=100) if o.to is Dest.CONTROL]
    assert ack.silent_workers == [{"worker_id": "w0", "pid": 100, "silent_for_s": 2.0}]
    (row,) = make_status(state)["models"]["m"]["workers"]
    assert row["state"] == "hung"
    report(state, pid=100, alive=False, gave_up=True, restarts=5, exited_pids=[100])
    (row,) = make_status(state)["models"]["m"]["workers"]
    assert row["state"] == "gave_up" and row["restarts"] == 5


def test_malformed_children_are_dropped_not_fatal() -> None:
    state, _ = make_state()
    state.handle_supervisor_state(SupervisorState(children=[{"name": 5}, {"name": "x", "pid": "nope", "exited_pids": ["a", 3]}]))
    assert state.supervisor is not None and state.supervisor.children == [{"name": "x", "exited_pids": [3]}]


def test_affinity_keys_are_bounded() -> None:
    state, _ = make_state(max_affinity_keys=4)
    ready(state, W0, capacity=100)
    for i in range(50):
        gen(state, f"r{i}", affinity=f"user-{i}")
    assert len(state.affinity) == 4


def test_client_gone_cancels_queued_and_running() -> None:
    state, _ = make_state()
    ready(state, W0, capacity=1)
    gen(state, "running")
    gen(state, "queued")
    outs = state.client_gone(C)
    assert [o.body.TYPE for o in outs if o.to is Dest.WORKER] == ["cancel"]
    assert not state.by_client and len(state.requests) == 1  # the running one awaits its worker's done


# ---- hung workers: heartbeats without engine progress -------------------------------------------


def beat(state: BrokerState, ident: bytes, elapsed_s: float, steps: int = 0) -> list[Out]:
    hb = Heartbeat(ident.decode(), steps_completed=steps, step_elapsed_s=elapsed_s)
    return state.handle_worker_message(ident, hb, hb.to_map())


def test_a_worker_without_progress_past_hung_step_s_is_lost_though_it_heartbeats() -> None:
    state, clock = make_state(hung_step_s=10.0)
    ready(state, W0)
    sent = dispatched(gen(state, "streamed") + gen(state, "fresh"))
    key_streamed = next(k for k in sent if state.requests[k].request.request_id == "streamed")
    state.handle_worker_message(W0, Chunk(key_streamed, "x", [1]), {"type": "chunk", "request_id": key_streamed})
    for elapsed_s in (0.0, 1.0, 2.0, 9.9):  # beats keep it alive; a long step is not a hang
        clock.advance(1.0)
        assert beat(state, W0, elapsed_s) == [] and W0 in state.workers
    clock.advance(1.0)
    outs = beat(state, W0, 10.0)
    assert W0 not in state.workers
    (err,) = to_client(outs)
    assert err["request_id"] == "streamed" and err["code"] == "worker_lost" and "no engine progress" in err["message"]
    # Remembered as silent: the supervisor's ack names it, so it is killed after hung_grace_s.
    assert state.silent["w0"].pid == 100
    sent = dispatched(ready(state, W1))
    assert [state.requests[k].request.request_id for k in sent] == ["fresh"]  # the unstarted one is requeued


def test_an_idle_worker_is_never_hung() -> None:
    state, clock = make_state(hung_step_s=10.0)
    ready(state, W0)
    clock.advance(1.0)
    assert beat(state, W0, 100.0) == [] and W0 in state.workers  # holds no work


def test_hung_workers_go_to_the_supervisor_in_the_ack() -> None:
    state, clock = make_state(hung_step_s=5.0)
    ready(state, W0, pid=100)
    gen(state, "r")
    clock.advance(1.0)
    beat(state, W0, 5.0)
    clock.advance(2.0)
    (ack,) = [o.body for o in report(state, pid=100) if o.to is Dest.CONTROL]
    assert ack.silent_workers == [{"worker_id": "w0", "pid": 100, "silent_for_s": 2.0}]
    (row,) = make_status(state)["models"]["m"]["workers"]
    assert row["state"] == "hung"
