"""Routing rules of broker.state that the cluster relies on, table-driven on a fake clock.

Credits: a worker's ``ready`` grants ``capacity`` credits; each dispatch takes one
and its ``done``/``error`` gives it back. Heartbeats keep a worker alive and
report its load, but never add credits (they lag, so trusting them would
overfill a replica). Ties between equally free replicas go to the least
recently used one; affinity keys stick to a replica while it lives.
"""

from __future__ import annotations

import pytest

from actors.clock import FakeClock
from actors.protocol import Dispatch, Done, Error, Generate, Heartbeat, Ready
from broker.records import Dest, Out
from broker.state import BrokerState
from broker.status import make_status

pytestmark = pytest.mark.timeout(30)


class Router:
    """A BrokerState with terse helpers; records where each request went."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.state = BrokerState(self.clock, models=("m",), heartbeat_interval_s=1.0, heartbeat_liveness=3)
        self.where: dict[str, str] = {}
        self._n = 0

    def took(self, outs: list[Out]) -> list[str]:
        went = []
        for o in outs:
            if o.to is Dest.WORKER and isinstance(o.body, Dispatch):
                rid = self.state.requests[o.body.request.request_id].request.request_id
                self.where[rid] = o.identity.decode()
                went.append(o.identity.decode())
        return went

    def ready(self, wid: str, capacity: int) -> None:
        self.took(self.state.handle_ready(wid.encode(), Ready(wid, "m", capacity, 1, "h")))
        self.clock.advance(0.01)

    def send(self, rid: str, affinity: str | None = None) -> list[str]:
        outs = self.state.handle_generate(b"c", Generate(request_id=rid, model="m", prompt="x", affinity=affinity))
        self.clock.advance(0.01)
        return self.took(outs)

    def end(self, rid: str, *, error: bool = False) -> list[str]:
        key = self.state.by_client[(b"c", rid)]
        worker = self.state.requests[key].worker
        assert worker is not None
        msg = Error("internal", "x", key) if error else Done(request_id=key, finish_reason="stop")
        self.clock.advance(0.01)
        return self.took(self.state.handle_worker_message(worker, msg, msg.to_map()))

    def beat(self, wid: str, free_slots: int) -> None:
        self.took(self.state.handle_worker_message(wid.encode(), Heartbeat(wid, 0, free_slots), {}))

    def running(self) -> dict[str, int]:
        return {w.worker_id: len(w.running) for w in self.state.workers.values()}


@pytest.mark.parametrize(("capacities", "sends", "expected"), [
    # most free credits first; equal credits go to the least recently used
    ({"a": 2, "b": 2}, 4, ["a", "b", "a", "b"]),
    ({"a": 4, "b": 1}, 5, ["a", "a", "a", "b", "a"]),
    ({"a": 1, "b": 3}, 5, ["b", "b", "a", "b", None]),
    ({"a": 0, "b": 0}, 1, [None]),
])
def test_most_free_credits_then_least_recently_used(capacities: dict[str, int], sends: int,
                                                   expected: list[str | None]) -> None:
    r = Router()
    for wid, cap in capacities.items():
        r.ready(wid, cap)
    got = [(r.send(f"r{i}") or [None])[0] for i in range(sends)]
    assert got == expected


def test_heartbeats_refresh_liveness_but_grant_no_credits() -> None:
    r = Router()
    r.ready("a", 1)
    r.send("r1")
    r.beat("a", free_slots=8)  # the worker's own view, lagging or not, adds nothing
    assert r.send("r2") == [] and r.running() == {"a": 1}
    r.clock.advance(2.5)
    r.beat("a", free_slots=0)
    r.clock.advance(2.5)
    assert r.state.tick() == [] and "a" in r.running()  # alive: the beat came within liveness
    assert r.end("r1") == ["a"]  # the done gives the credit back; the queued request takes it


@pytest.mark.parametrize("error", [False, True])
def test_done_and_error_both_return_the_credit(error: bool) -> None:
    r = Router()
    r.ready("a", 1)
    r.send("r1")
    r.send("r2")
    assert r.end("r1", error=error) == ["a"]


def test_ready_again_resets_the_credits() -> None:
    r = Router()
    r.ready("a", 2)
    r.send("r1")
    r.send("r2")
    r.ready("a", 3)  # a restarted worker: what it held is requeued onto its fresh credits
    assert r.running() == {"a": 2} and len(r.state.models["m"].queue) == 0


def test_retiring_worker_gets_nothing_new_but_finishes_its_work() -> None:
    r = Router()
    r.ready("a", 4)
    r.ready("b", 4)
    r.send("r1")
    retiring = r.where["r1"]
    r.state.workers[retiring.encode()].retiring = True
    assert all(r.send(f"n{i}") != [retiring] for i in range(4))
    assert r.end("r1") == []  # its slot is not refilled
    assert make_status(r.state)["models"]["m"]["workers"][0 if retiring == "a" else 1]["state"] == "retiring"


def test_affinity_sticks_while_the_replica_lives_and_waits_when_it_is_full() -> None:
    r = Router()
    r.ready("a", 2)
    r.ready("b", 2)
    first = r.send("s1", affinity="k")[0]
    assert [r.send(f"s{i}", affinity="k") for i in (2, 3)] == [[first], []]  # the third waits for its replica
    other = "b" if first == "a" else "a"
    assert r.send("plain") == [other]
    assert r.end("s1") == [first] and r.where["s3"] == first


def test_peak_in_flight_is_recorded_per_worker() -> None:
    r = Router()
    r.ready("a", 3)
    for i in range(5):
        r.send(f"r{i}")
    for i in range(5):
        r.end(f"r{i}")
    (w,) = make_status(r.state)["models"]["m"]["workers"]
    assert w["max_in_flight"] == 3 and w["served"] == 5 and w["in_flight"] == 0
