"""Unit tests for broker.adoption and broker.parking: a new broker takes over the requests of the last.

A :class:`NewBroker` harness holds a fresh BrokerState (key prefix ``n``), its Adoption and
its Parking on a fake clock; workers register with in-flight tables and clients resend by
hand. No sockets, no sleeping.
"""

from __future__ import annotations

from typing import Any

import pytest

from actors.clock import FakeClock
from actors.control import SupervisorState
from actors.protocol import (
    TIMEOUT, WORKER_LOST, Cancel, Chunk, Disconnect, Dispatch, Done, Error, Generate, Message, Ready,
)
from broker.adoption import Adoption, parse_row
from broker.parking import Parking
from broker.records import Dest, Out
from broker.state import BrokerState

pytestmark = pytest.mark.timeout(30)

T0 = 500.0
C1, C2 = b"client-1", b"client-2"


def row(key: str, client: bytes = C1, rid: str = "r1", **fields: Any) -> dict[str, Any]:
    """One row of a worker's in-flight table, as a worker sends it."""
    return {"request_id": key, "client": client.hex(), "client_request_id": rid, "stream": True,
            "started": False, "finished": False, "completion_tokens": 0, "text_chars": 0, "priority": "default",
            **fields}


def body(out: Out) -> dict[str, Any]:
    return out.body.to_map() if isinstance(out.body, Message) else dict(out.body)


class NewBroker:
    """A broker that has just started, and what it sent to clients and workers."""

    def __init__(self, *, window_s: float = 3.0, **kwargs: Any) -> None:
        self.clock = FakeClock(T0)
        kwargs.setdefault("heartbeat_liveness", 1000)  # no worker goes silent here unless a test says so
        self.state = BrokerState(self.clock, models=("a",), key_prefix="n", **kwargs)
        self.adoption = Adoption(self.state, self.clock, window_s=window_s)
        self.outs: list[Out] = []

    def keep(self, outs: list[Out]) -> list[Out]:
        self.outs += outs
        return outs

    def ready(self, wid: str, rows: list[dict[str, Any]] | None, capacity: int = 4) -> list[Out]:
        msg = Ready(worker_id=wid, model="a", capacity=capacity, pid=1, host="h", requests=rows)
        return self.keep(self.adoption.handle_ready(wid.encode(), msg))

    def generate(self, client: bytes = C1, rid: str = "r1", *, resend: bool = False) -> list[Out]:
        msg = Generate(request_id=rid, model="a", prompt="hi", resend=resend or None)
        return self.keep(self.adoption.handle_generate(client, msg))

    def cancel(self, client: bytes = C1, rid: str = "r1") -> list[Out]:
        return self.keep(self.adoption.handle_cancel(client, rid))

    def worker_says(self, wid: str, msg: Message) -> list[Out]:
        return self.keep(self.state.handle_worker_message(wid.encode(), msg, msg.to_map()))

    def tick(self, advance_s: float = 0.0) -> list[Out]:
        self.clock.advance(advance_s)
        return self.keep(self.state.tick() + self.adoption.tick())

    def to_client(self, client: bytes = C1) -> list[dict[str, Any]]:
        return [body(o) for o in self.outs if o.to is Dest.CLIENT and o.identity == client]

    def to_worker(self, wid: str, cls: type[Message]) -> list[Message]:
        return [o.body for o in self.outs if o.to is Dest.WORKER and o.identity == wid.encode()
                and isinstance(o.body, cls)]


def dispatches(outs: list[Out]) -> list[str]:
    """The client request ids dispatched in ``outs``."""
    return [o.body.client_request_id for o in outs if isinstance(o.body, Dispatch)]


# ---- adopting a table ------------------------------------------------------------------------


def test_a_table_row_routes_the_workers_output_to_its_client_under_its_own_id() -> None:
    b = NewBroker()
    b.ready("w0", [row("o.7", rid="mine", started=True, text_chars=3)])
    b.worker_says("w0", Chunk("o.7", "abc", [1, 2], 0, 0))  # the worker sends the output again from its start
    b.worker_says("w0", Chunk("o.7", "d", [3], 3, 2))
    b.worker_says("w0", Done("o.7", "stop", {"prompt_tokens": 2, "completion_tokens": 3}))
    got = b.to_client()
    assert [(m["type"], m["request_id"]) for m in got] == [("chunk", "mine"), ("chunk", "mine"), ("done", "mine")]
    assert (got[1]["text_offset"], got[1]["token_offset"]) == (3, 2)  # offsets reach the client untouched
    assert b.state.requests == {} and b.state.workers[b"w0"].running == set()
    assert b.adoption.counters["adopted"] == 1


def test_adopted_requests_hold_their_slots_and_new_keys_never_collide() -> None:
    b = NewBroker()
    b.ready("w0", [row("o.1", rid="x"), row("o.2", rid="y")], capacity=2)
    assert dispatches(b.generate(C2, "fresh")) == []  # both slots are taken by adopted requests
    b.worker_says("w0", Done("o.1", "stop"))
    (sent,) = [o.body for o in b.outs if isinstance(o.body, Dispatch)]
    assert sent.client_request_id == "fresh" and sent.client == C2.hex()
    assert sent.request.request_id.startswith("n") and sent.request.request_id not in ("o.1", "o.2")


@pytest.mark.parametrize("bad", [
    {"client": "not hex"}, {"client": ""}, {"client_request_id": ""}, {"request_id": 7}, {"stream": "yes"},
    {"timeout_s": -1}, {"timeout_s": True}, {"priority": "soon"}, {"affinity": 5}, {"client_request_id": "x" * 257},
])
def test_malformed_rows_are_dropped_and_counted(bad: dict[str, Any]) -> None:
    broken = {**row("o.1"), **bad}
    assert parse_row(broken) is None
    b = NewBroker()
    b.ready("w0", [broken, row("o.2", rid="ok"), "not a map"])
    assert list(b.state.requests) == ["o.2"] and b.adoption.counters["rows_refused"] == 2


def test_rows_that_cannot_be_adopted_are_cancelled_on_their_worker() -> None:
    b = NewBroker()
    b.generate(C1, "taken")  # runs anew here (a resend that no table held)
    b.ready("w0", [], capacity=1)
    b.ready("w1", [row("n99", rid="a"),  # our own prefix: it ended here already
                   row("o.5", rid="taken"),  # the client's id names a request that runs anew
                   row("o.6", rid="b", finished=True),  # an answered row that cannot be adopted: nothing to cancel
                   row("o.7", rid="b")])  # a live row claims its id before the answered one
    assert [c.request_id for c in b.to_worker("w1", Cancel)] == ["n99", "o.5"]
    assert sorted(b.state.requests) == ["n1", "o.7"]


def test_registering_again_with_the_same_table_answers_nothing_twice() -> None:
    b = NewBroker()
    table = [row("o.1", stream=False, finished=True), row("o.2", rid="r2")]
    b.ready("w0", table)
    b.worker_says("w0", Done("o.1", "length", text="all of it"))
    b.ready("w0", table)  # the worker registers again (it took a stale request to register as for it)
    b.worker_says("w0", Done("o.1", "length", text="all of it"))  # its replay: no record, dropped
    b.worker_says("w0", Done("o.2", "stop"))
    ends = [(m["request_id"], m["type"]) for m in b.to_client() if m["type"] in ("done", "error")]
    assert ends == [("r1", "done"), ("r2", "done")]
    assert b.to_worker("w0", Cancel) == []


def test_a_worker_registering_again_keeps_what_it_lists_and_loses_the_rest() -> None:
    b = NewBroker()
    b.ready("w0", [], capacity=4)
    b.generate(C1, "kept")
    b.generate(C1, "unlisted")
    b.worker_says("w0", Chunk("n2", "out", [1]))  # the unlisted one had shown output
    b.ready("w0", [row("n1", rid="kept")])
    b.worker_says("w0", Done("n1", "stop"))
    ends = {m["request_id"]: m for m in b.to_client() if m["type"] in ("done", "error")}
    assert ends["kept"]["type"] == "done"
    assert ends["unlisted"]["code"] == WORKER_LOST


def test_a_worker_declared_dead_that_comes_back_keeps_what_was_queued_again_for_want_of_another() -> None:
    b = NewBroker(heartbeat_liveness=3)
    b.ready("w0", [], capacity=2)
    b.generate(C1, "r1")
    b.tick(3.0)  # silent: declared dead; its request (no output yet) waits for a worker again
    assert b.state.workers == {} and len(b.state.models["a"].queue) == 1
    b.ready("w0", [row("n1", rid="r1", stream=False)])  # it never stopped running it
    assert b.to_worker("w0", Cancel) == [] and len(b.to_worker("w0", Dispatch)) == 1  # not sent twice
    b.worker_says("w0", Done("n1", "stop", text="once"))
    assert [(m["type"], m.get("text")) for m in b.to_client()] == [("done", "once")]


def test_an_adopted_request_is_never_requeued_and_still_times_out() -> None:
    b = NewBroker()
    b.ready("w0", [row("o.1", rid="lost"), row("o.2", rid="slow", timeout_s=1.0)])
    b.ready("w1", [row("o.3", rid="orphan")])
    b.worker_says("w1", Disconnect(reason="crash"))
    b.tick(1.0)
    ends = {m["request_id"]: m for m in b.to_client() if m["type"] == "error"}
    assert ends["orphan"]["code"] == WORKER_LOST and "adopted" in ends["orphan"]["message"]
    assert ends["slow"]["code"] == TIMEOUT and [c.request_id for c in b.to_worker("w0", Cancel)] == ["o.2"]
    assert "lost" not in ends and dispatches(b.outs) == []


# ---- resends ---------------------------------------------------------------------------------


def test_a_resend_of_an_adopted_request_is_joined_not_run() -> None:
    b = NewBroker()
    b.ready("w0", [row("o.1")])
    assert b.generate(resend=True) == []
    b.tick(5.0)
    assert dispatches(b.outs) == [] and b.adoption.counters["resends_joined"] == 1


def test_a_resend_that_comes_before_the_table_waits_for_it() -> None:
    b = NewBroker()
    b.ready("w0", [])
    assert b.generate(resend=True) == []
    b.tick(1.0)
    b.ready("w1", [row("o.1")])
    b.tick(5.0)
    assert dispatches(b.outs) == [] and b.adoption.held == {}
    b.worker_says("w1", Done("o.1", "stop"))
    assert [m["type"] for m in b.to_client()] == ["done"]


@pytest.mark.parametrize("advance_s, runs", [(2.9, False), (3.0, True)])
def test_a_resend_no_table_holds_runs_when_the_window_ends(advance_s: float, runs: bool) -> None:
    b = NewBroker(window_s=3.0)
    b.ready("w0", [])
    b.generate(resend=True)
    assert dispatches(b.tick(advance_s)) == (["r1"] if runs else [])


def test_a_plain_generate_is_never_held_and_a_resend_after_the_window_runs_at_once() -> None:
    b = NewBroker()
    b.ready("w0", [])
    assert dispatches(b.generate(C1, "new")) == ["new"]
    b.tick(3.0)
    assert dispatches(b.generate(C2, "late", resend=True)) == ["late"]
    assert dispatches(b.generate(C2, "late", resend=True)) == []  # runs already: joined, not refused
    assert not [m for m in b.to_client(C2) if m["type"] == "error"]


def test_the_window_ends_once_every_worker_the_supervisor_runs_is_back() -> None:
    b = NewBroker(window_s=30.0)
    children = [{"name": f"worker:w{i}", "kind": "worker", "worker_id": f"w{i}", "model": "a", "alive": True}
                for i in range(2)] + [{"name": "worker:w9", "kind": "worker", "worker_id": "w9", "alive": False}]
    b.state.handle_supervisor_state(SupervisorState(children=children))
    b.generate(resend=True)
    b.ready("w0", [])
    assert dispatches(b.tick(0.1)) == []  # w1 may still bring a table
    b.ready("w1", [])
    assert dispatches(b.tick(0.1)) == ["r1"]


def test_a_resend_of_an_adopted_request_that_ended_is_not_run_again() -> None:
    b = NewBroker()
    b.ready("w0", [row("o.1", stream=False, finished=True)])
    b.worker_says("w0", Done("o.1", "stop", text="t"))
    b.tick(5.0)
    assert b.generate(resend=True) == []  # its answer went out (or waits for the client to be back)
    assert dispatches(b.outs) == []


# ---- cancels ----------------------------------------------------------------------------------


def test_a_cancel_that_comes_before_the_table_is_applied_when_it_comes() -> None:
    b = NewBroker()
    assert b.cancel(C1, "r1") == []
    b.ready("w0", [row("o.1", started=True)])
    assert [c.request_id for c in b.to_worker("w0", Cancel)] == ["o.1"]
    b.worker_says("w0", Done("o.1", "cancelled"))
    assert [m.get("finish_reason") for m in b.to_client()] == ["cancelled"]


def test_a_cancel_of_a_held_resend_answers_at_once_and_it_never_runs() -> None:
    b = NewBroker()
    b.ready("w0", [])
    b.generate(resend=True)
    b.clock.advance(0.5)
    (out,) = b.cancel()
    assert isinstance(out.body, Done) and out.body.finish_reason == "cancelled"
    assert out.body.timings["queue_s"] == pytest.approx(0.5)
    b.tick(5.0)
    assert dispatches(b.outs) == []


# ---- clients not back yet ----------------------------------------------------------------------


def test_a_client_with_requests_adopted_lately_is_awaited() -> None:
    b = NewBroker()
    b.ready("w0", [row("o.1")])
    b.generate(C2, "fresh")
    assert b.adoption.awaits(C1) and not b.adoption.awaits(C2)
    b.worker_says("w0", Done("o.1", "stop"))
    assert b.adoption.awaits(C1)  # its answer may be what it has not come back for yet
    b.tick(60.0)
    assert not b.adoption.awaits(C1)


def out_for(client: bytes, n: int) -> Out:
    return Out(Dest.CLIENT, client, Chunk("r", str(n), [n]))


def test_parked_messages_go_in_order_once_the_client_is_back() -> None:
    clock = FakeClock(T0)
    parking = Parking(clock, return_s=10.0)
    reachable: set[bytes] = set()
    sent: list[tuple[bytes, str]] = []

    def try_send(out: Out) -> bool:
        if out.identity not in reachable:
            return False
        sent.append((out.identity, out.body.text))
        return True

    for n in range(3):
        parking.park(out_for(C1, n))
    assert parking.holds(C1) and not parking.holds(C2) and len(parking) == 3
    assert parking.flush(try_send) == [] and sent == []
    reachable.add(C1)
    clock.advance(9.9)
    assert parking.flush(try_send) == [] and sent == [(C1, "0"), (C1, "1"), (C1, "2")]
    assert not parking.holds(C1) and parking.parked_total == 3


@pytest.mark.parametrize("advance_s, count, gone", [(9.9, 5, False), (10.0, 1, True), (0.0, 6, True)])
def test_a_client_not_back_in_time_or_too_far_behind_is_given_up(advance_s: float, count: int, gone: bool) -> None:
    clock = FakeClock(T0)
    parking = Parking(clock, return_s=10.0, max_messages=5)
    for n in range(count):
        parking.park(out_for(C1, n))
    clock.advance(advance_s)
    assert parking.flush(lambda out: False) == ([C1] if gone else [])
    assert parking.holds(C1) is not gone


def test_every_adopted_request_gets_exactly_one_terminal_through_a_mixed_schedule() -> None:
    b = NewBroker()
    b.ready("w0", [row("o.1", rid="a", started=True), row("o.2", rid="b", stream=False, finished=True),
                   row("o.3", rid="c")], capacity=3)
    b.generate(C1, "c", resend=True)  # joined
    b.generate(C1, "d", resend=True)  # held, then runs
    b.cancel(C1, "a")
    b.worker_says("w0", Done("o.1", "cancelled"))
    b.worker_says("w0", Done("o.2", "length", text="t"))
    b.worker_says("w0", Error("internal", "boom", "o.3"))
    b.tick(3.0)
    (key,) = [o.body.request.request_id for o in b.outs if isinstance(o.body, Dispatch)]
    b.worker_says("w0", Done(key, "stop"))
    ends: dict[str, int] = {}
    for m in b.to_client():
        if m["type"] in ("done", "error"):
            ends[m["request_id"]] = ends.get(m["request_id"], 0) + 1
    assert ends == {"a": 1, "b": 1, "c": 1, "d": 1} and b.state.requests == {}
