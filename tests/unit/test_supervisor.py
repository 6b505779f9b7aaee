"""Unit tests for the supervisor: its children registry, model management and hung workers.

Fake processes and a fake clock; no sockets, no spawning, no sleeping.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from actors.children import Children, ChildSpec, RestartPolicy, WorkerSpec
from actors.clock import FakeClock
from actors.config import FleetConfig, ModelSpec
from actors.control import Start, Stop, SupervisorStateAck

pytestmark = pytest.mark.timeout(10)

# ---- supervisor restarts ------------------------------------------------------------------------


class FakeProcess:
    """Stands in for a multiprocessing Process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exitcode: int | None = None
        self.signals: list[str] = []

    def is_alive(self) -> bool:
        return self.exitcode is None

    def terminate(self) -> None:
        self.signals.append("TERM")

    def kill(self) -> None:
        self.signals.append("KILL")
        self.exitcode = -9

    def join(self, timeout: float | None = None) -> None:
        pass


class FakeLauncher:
    """Launches FakeProcesses with fresh pids, and remembers what it launched."""

    def __init__(self) -> None:
        self.pids = iter(range(500, 600))
        self.launched: list[str] = []

    def __call__(self, spec: ChildSpec) -> FakeProcess:
        self.launched.append(spec.name)
        return FakeProcess(next(self.pids))


RESTARTS = RestartPolicy(backoff_s=0.5, backoff_max_s=2.0, window_s=60.0, max_restarts=3)


@pytest.fixture
def supervisor() -> Any:
    from actors.supervisor import Supervisor, Wiring

    def unused(*_: Any) -> None:
        raise AssertionError("no entry point runs: the launcher is fake")

    clock = FakeClock()
    wiring = Wiring(run_broker=unused, run_worker=unused, run_collector=unused, run_gateway=unused,
                    check_source=unused, weights_bytes=lambda source: None)
    cfg = dataclasses.replace(FleetConfig(), models=(ModelSpec("m", "demo", 1),), restart_max=3, restart_window_s=60.0,
                              restart_backoff_s=0.5, restart_backoff_max_s=2.0, metrics_export=False, http_port=0)
    sup = Supervisor(cfg, wiring, clock=clock, launch=FakeLauncher())
    sup.children.start_all()
    return sup, clock


def test_restart_backoff_doubles_and_gives_up_past_the_limit(supervisor: Any) -> None:
    sup, clock = supervisor
    worker = sup.children["worker:m-0"]
    delays = []
    for _ in range(3):
        worker.process.exitcode = 1
        assert sup.check_children()
        delays.append(worker.next_start_s - clock.now())
        clock.advance(delays[-1])
        sup.check_children()
        assert worker.alive
    assert delays == [0.5, 1.0, 2.0] and worker.restarts == 3
    worker.process.exitcode = 1
    sup.check_children()
    assert worker.gave_up and not worker.alive and sup.failure is None
    entry = worker.view(clock.now())
    assert entry["gave_up"] and entry["restarts"] == 3 and len(entry["exited_pids"]) == 4


def crash(sup: Any, child: Any, clock: FakeClock, wait_s: float | None = None) -> None:
    """The child's process exits; time passes (its backoff when ``wait_s`` is None); the supervisor looks again."""
    child.process.exitcode = 1
    sup.check_children()
    clock.advance(child.next_start_s - clock.now() if wait_s is None else wait_s)
    sup.check_children()


def test_a_stable_run_resets_the_backoff_and_old_restarts_expire(supervisor: Any) -> None:
    sup, clock = supervisor
    worker = sup.children["worker:m-0"]
    for _ in range(3):
        crash(sup, worker, clock)
    clock.advance(61.0)  # ran longer than restart_window_s
    worker.process.exitcode = 1
    sup.check_children()
    assert not worker.gave_up and worker.next_start_s - clock.now() == 0.5


def test_a_run_of_restart_stable_s_resets_the_backoff(supervisor: Any) -> None:
    sup, clock = supervisor
    broker = sup.children["broker"]
    crash(sup, broker, clock)
    crash(sup, broker, clock)  # ran for no time: the backoff grew
    assert broker.backoff_s == 2.0
    clock.advance(sup.cfg.restart_stable_s)  # a kill every so often, each after a stable run
    broker.process.exitcode = -9
    sup.check_children()
    assert broker.next_start_s - clock.now() == 0.5


def test_a_planned_restart_signals_the_broker_and_starts_it_again_at_once(supervisor: Any) -> None:
    sup, clock = supervisor
    signals: list[tuple[int, int]] = []
    sup.children._send_signal = lambda pid, sig: signals.append((pid, sig))
    broker = sup.children["broker"]
    first = broker.pid
    for n in range(5):  # more than restart_max: planned restarts are not crashes
        assert sup.children.hand_over("broker") and not sup.children.hand_over("broker")  # asked once
        broker.process.exitcode = 0  # it handed over and exited
        assert sup.check_children() and broker.alive and broker.restarts == n + 1
    import signal as signals_mod
    assert signals[0] == (first, signals_mod.SIGUSR1) and len(signals) == 5
    assert not broker.gave_up and broker.restart_times_s == [] and broker.backoff_s == 0.5


def test_a_broker_that_does_not_hand_over_in_time_is_killed(supervisor: Any) -> None:
    sup, clock = supervisor
    sup.children._send_signal = lambda pid, sig: None
    broker = sup.children["broker"]
    old = broker.process
    sup.children.hand_over("broker")
    clock.advance(sup.children.stop_grace_s - 0.1)
    sup.check_children()
    assert old.signals == [] and broker.process is old
    clock.advance(0.1)
    sup.check_children()
    assert old.signals == ["KILL"] and broker.alive and broker.process is not old  # killed, then started at once


def test_giving_up_on_the_broker_stops_the_fleet(supervisor: Any) -> None:
    sup, clock = supervisor
    broker = sup.children["broker"]
    for _ in range(4):
        crash(sup, broker, clock, wait_s=10.0)
    assert broker.gave_up and sup.failure and sup.stop_event.is_set()


def test_a_hung_worker_is_killed_once_silent_past_the_grace(supervisor: Any) -> None:
    sup, clock = supervisor
    worker = sup.children["worker:m-0"]
    grace = sup.cfg.hung_grace_s
    sup.handle(SupervisorStateAck(silent_workers=[{"worker_id": "m-0", "pid": worker.pid, "silent_for_s": grace - 1}]))
    assert worker.alive
    sup.handle(SupervisorStateAck(silent_workers=[{"worker_id": "m-0", "pid": 1, "silent_for_s": grace + 1}]))
    assert worker.alive  # an older process of the same worker: not this one
    sup.handle(SupervisorStateAck(registered=["m-0"], silent_workers=[
        {"worker_id": "m-0", "pid": worker.pid, "silent_for_s": grace}]))
    assert not worker.alive and worker.process.signals == ["KILL"] and sup.registered == {"m-0"}
    assert sup.check_children() and worker.last_exit == -9  # then restarted like any exit


def test_the_state_names_every_child_and_the_models() -> None:
    from actors.supervisor import Supervisor, Wiring

    wiring = Wiring(run_broker=print, run_worker=print, run_collector=print, run_gateway=print,
                    check_source=lambda source: None, weights_bytes=lambda source: 1000)
    cfg = dataclasses.replace(FleetConfig(), models=(ModelSpec("m", "demo", 2), ModelSpec("lazy", "demo", 1, on_demand=True)),
                              memory_budget_bytes=10_000)
    sup = Supervisor(cfg, wiring, clock=FakeClock(), launch=FakeLauncher())
    assert [c.name for c in sup.children] == ["collector", "broker", "worker:m-0", "worker:m-1", "gateway"]
    state = sup.state()
    assert [c["name"] for c in state.children] == [c.name for c in sup.children]
    assert [m["name"] for m in state.models] == ["m", "lazy"]
    assert state.memory == {"budget_bytes": 10_000, "loaded_bytes": 2000}


# ---- the children registry and model management -------------------------------------------------


def make_children(max_restarts: int = 3) -> tuple[Children, FakeClock, FakeLauncher]:
    clock, launcher = FakeClock(), FakeLauncher()
    return Children(launcher, clock, dataclasses.replace(RESTARTS, max_restarts=max_restarts), stop_grace_s=10.0), clock, launcher


def test_retired_children_leave_at_once_and_are_killed_after_the_grace() -> None:
    children, clock, launcher = make_children()
    for i in range(2):
        children.start(children.add(ChildSpec.for_worker(WorkerSpec(f"m-{i}", "m", "demo"))).name)
    a, b = children["worker:m-0"], children["worker:m-1"]
    assert children.retire([a, b]) == ["worker:m-0", "worker:m-1"]
    assert len(children) == 0 and a.process.signals == b.process.signals == ["TERM"]
    a.process.exitcode = 0  # a leaves in time
    clock.advance(9.0)
    children.reap()
    assert children.retiring() == [b] and b.process.signals == ["TERM"]
    clock.advance(1.0)
    children.reap()
    assert b.process.signals == ["TERM", "KILL"]
    children.reap()
    assert children.retiring() == []
    assert children.check() == []  # retired children are never restarted


def test_a_duplicate_child_name_is_refused() -> None:
    children, _, _ = make_children()
    children.add(ChildSpec.service("broker"))
    with pytest.raises(ValueError, match="already supervised"):
        children.add(ChildSpec.service("broker"))


def make_manager(budget_bytes: int = 0, weights: int | None = 100) -> tuple[Any, Children]:
    from actors.model_manager import ModelManager

    def check_source(source: str) -> None:
        if source.startswith("/missing"):
            raise FileNotFoundError(f"model source {source!r} is neither a folder nor a hub id (owner/name)")

    children, _, _ = make_children()
    cfg = dataclasses.replace(FleetConfig(), models=(ModelSpec("a", "demo", 1),), memory_budget_bytes=budget_bytes)
    manager = ModelManager(cfg, children, check_source=check_source, weights_bytes=lambda source: weights)
    manager.add_configured()
    children.start_all()
    return manager, children


def test_load_takes_its_own_dtype_or_the_fleets() -> None:
    from actors.protocol import Load

    manager, children = make_manager()
    manager.handle(Load(model="b", source="demo", dtype="bfloat16", request_id="k1"))
    manager.handle(Load(model="c", source="demo", request_id="k2"))
    assert [c.spec.worker.dtype for c in children.workers("b")] == ["bfloat16"]
    assert [c.spec.worker.dtype for c in children.workers("c")] == [FleetConfig().dtype]


def test_load_starts_workers_under_fresh_ids_and_unload_retires_them() -> None:
    from actors.protocol import ControlReply, Load

    manager, children = make_manager()
    reply = manager.handle(Load(model="b", source="demo", replicas=2, request_id="k1"))
    assert isinstance(reply, ControlReply) and reply.workers == ["b-0", "b-1"] and reply.request_id == "k1"
    assert [c.worker_id for c in children.workers("b")] == ["b-0", "b-1"] and all(c.alive for c in children)
    stop = manager.handle(Stop("k2", "b", forget=False))
    assert isinstance(stop, ControlReply) and stop.workers == ["b-0", "b-1"] and not children.workers("b")
    again = manager.handle(Start("k3", "b"))
    assert isinstance(again, ControlReply) and again.workers == ["b-0.1", "b-1.1"]  # a new generation
    assert manager.handle(Start("k4", "b")).message == "already running"
    gone = manager.handle(Stop("k5", "b", forget=True))
    assert gone.op == "unload" and "b" not in {m["name"] for m in manager.models_view()}
    assert manager.handle(Start("k6", "b")).code == "unknown_model"


@pytest.mark.parametrize(("load", "budget", "weights", "code"), [
    ({"model": "a", "source": "demo"}, 0, 100, "bad_request"),  # already loaded
    ({"model": "b", "source": "/missing/model"}, 0, 100, "bad_request"),
    ({"model": "b", "source": "demo", "replicas": 2}, 250, 100, "over_budget"),  # 100 loaded + 200 > 250
    ({"model": "b", "source": "demo"}, 250, None, "over_budget"),  # size unknown with a budget set
])
def test_load_refusals_by_the_supervisor(load: dict[str, Any], budget: int, weights: int | None, code: str) -> None:
    from actors.protocol import Error, Load

    manager, children = make_manager(budget, weights if load["model"] == "b" else 100)
    reply = manager.handle(Load(request_id="k", **load))
    assert isinstance(reply, Error) and reply.code == code and reply.request_id == "k"
    assert [c.name for c in children] == ["worker:a-0"]


def test_given_up_workers_free_their_budget() -> None:
    manager, children = make_manager(budget_bytes=150)
    assert manager.memory_view() == {"budget_bytes": 150, "loaded_bytes": 100}
    a = children["worker:a-0"]
    for _ in range(4):
        a.process.exitcode = 1
        children.check()
        children.clock.advance(5.0)
        children.check()
    assert a.gave_up and manager.memory_view()["loaded_bytes"] == 0
