"""Unit tests, on a fake clock: fair turns across clients, deadlines at dispatch, clients that go away.

Covers broker.queue (client turns within a priority, aging between them),
broker.deadlines and the state's deadline handling, broker.connections (connection
events to routing ids) and what BrokerState does when a client is gone.
"""

from __future__ import annotations

import math

import pytest

from actors.protocol import BAD_REQUEST, CANCEL_CLIENT_GONE, CANCEL_TIMEOUT, TIMEOUT, Cancel, Error
from broker.connections import ClientConnections
from broker.deadlines import Deadlines
from broker.queue import PriorityQueue
from broker.records import ClientGone
from broker.status import make_status
from tests.unit.broker_harness import T0, Fleet, body_map, dispatched, worker_outs

pytestmark = pytest.mark.timeout(30)

A, B, C = b"A", b"B", b"C"


# ---- the queue: client turns within a priority ----------------------------------------------------

# (key, client, priority, arrival offset) pushed in order; then the keys taken (dispatched), in order;
# then the service order expected for what is left.
QUEUE_CASES = [
    pytest.param([("a0", A, "default", 0), ("a1", A, "default", 1), ("a2", A, "default", 2),
                  ("b0", B, "default", 3)], [], ["a0", "b0", "a1", "a2"], id="a flood does not push a later client back"),
    pytest.param([("a0", A, "default", 0), ("a1", A, "default", 1), ("b0", B, "default", 3)], ["a0"],
                 ["b0", "a1"], id="a client just served goes to the back"),
    pytest.param([("a0", A, "default", 0), ("a1", A, "default", 1), ("b0", B, "default", 2), ("b1", B, "default", 3),
                  ("c0", C, "default", 4)], [], ["a0", "b0", "c0", "a1", "b1"], id="three clients take turns"),
    pytest.param([("a0", A, "default", 0), ("a1", A, "default", 1), ("b0", B, "default", 2)], ["b0"],
                 ["a0", "a1"], id="one client left: its own arrival order"),
    pytest.param([("a0", A, "urgent", 0), ("a1", A, "urgent", 1), ("b0", B, "default", 0.5)], [],
                 ["a0", "a1", "b0"], id="priority still goes first across clients"),
    pytest.param([("a0", A, "default", 0), ("b0", B, "background", -5), ("a1", A, "default", 1)], [],
                 ["b0", "a0", "a1"], id="aging between priorities is kept"),
    pytest.param([("a0", A, "urgent", 0), ("a1", A, "urgent", 1), ("b0", B, "urgent", 2), ("b1", B, "urgent", 3),
                  ("c0", C, "default", 0)], ["a0"], ["b0", "a1", "c0", "b1"], id="turns inside the urgent class"),
]


@pytest.mark.parametrize(("pushes", "takes", "expected"), QUEUE_CASES)
def test_queue_order_with_client_turns(pushes: list[tuple[str, bytes, str, float]], takes: list[str],
                                       expected: list[str]) -> None:
    q: PriorityQueue[str] = PriorityQueue(aging_s=2.0)
    for key, client, prio, at in pushes:
        q.push(key, key, prio, T0 + at, client)
    for key in takes:
        assert q.take(key) == key
    assert [k for k, _ in q.ordered()] == expected
    assert len(q) == len(expected)


def test_a_cancel_keeps_the_clients_place_and_a_dispatch_does_not() -> None:
    q: PriorityQueue[str] = PriorityQueue()
    for key, client, at in (("a0", A, 0), ("a1", A, 1), ("a2", A, 2), ("b0", B, 3), ("b1", B, 4)):
        q.push(key, key, "default", T0 + at, client)
    assert q.remove("a0") == "a0"  # cancelled: A stays at the front
    assert [k for k, _ in q.ordered()] == ["a1", "b0", "a2", "b1"]
    assert q.take("a1") == "a1"  # dispatched: B's turn
    assert [k for k, _ in q.ordered()] == ["b0", "a2", "b1"]
    assert q.remove("zz") is None and q.take("zz") is None
    assert q.waiting_clients() == 2


def test_ordered_is_a_snapshot_safe_to_read_while_dispatching() -> None:
    q: PriorityQueue[str] = PriorityQueue()
    for i in range(6):
        q.push(f"k{i}", f"k{i}", "default", T0 + i, A if i % 2 else B)
    seen = []
    for key, _ in q.ordered():
        seen.append(key)
        q.take(key)
    assert seen == ["k0", "k1", "k2", "k3", "k4", "k5"] and len(q) == 0


# ---- the state: fair admission ---------------------------------------------------------------------


def test_a_flooding_client_cannot_starve_another() -> None:
    f = Fleet()
    w = f.ready("w", capacity=2)
    for i in range(20):
        f.generate(b"flood", f"f{i}")
    f.clock.advance(1.0)
    assert f.generate(b"polite", "p0") == []  # both slots busy: it waits
    assert make_status(f.state)["models"]["a"]["clients_waiting"] == 2
    # The flood's turn comes first (it was waiting before), then the polite client's, not after all 18.
    assert dispatched(f.done(b"flood", "f0")) == [(w, f.key(b"flood", "f2"))]
    assert dispatched(f.done(b"flood", "f1")) == [(w, f.key(b"polite", "p0"))]
    assert dispatched(f.done(b"flood", "f2")) == [(w, f.key(b"flood", "f3"))]
    f.done(b"polite", "p0")
    assert f.terminal(b"polite", "p0")["type"] == "done"
    f.fail_all()
    f.check()


def test_requeued_request_keeps_its_client_and_arrival() -> None:
    f = Fleet()
    w0 = f.ready("w0", capacity=1)
    f.generate(b"c1", "first")
    f.generate(b"c2", "second")
    f.record(f.state.worker_gone(w0, "test"))  # "first" had no output: requeued for its own client
    # c1 already had its turn, so c2 goes first; the requeued request keeps its arrival time (and aging).
    assert [(k, rec.client, rec.enqueued_at_s) for k, rec in f.state.models["a"].queue.ordered()] == [
        (f.key(b"c2", "second"), b"c2", T0), (f.key(b"c1", "first"), b"c1", T0)]
    w1 = f.ready("w1", capacity=2)
    assert {k for _, k in dispatched(f.sent[-2:])} == {f.key(b"c1", "first"), f.key(b"c2", "second")}
    assert f.running(w1) == 2


# ---- deadlines ---------------------------------------------------------------------------------------


def test_deadlines_heap_orders_skips_stale_and_compacts() -> None:
    d = Deadlines()
    live = {"x": 5.0, "y": 3.0, "z": 9.0}

    def is_live(key: str, at: float) -> bool:
        return live.get(key) == at

    for key, at in live.items():
        d.add(key, at)
    assert d.next_s(is_live) == 3.0
    del live["y"]  # ended before its deadline
    assert d.next_s(is_live) == 5.0 and d.due(4.9, is_live) == []
    assert d.due(9.0, is_live) == ["x", "z"] and d.next_s(is_live) == math.inf
    for i in range(3000):
        d.add(f"gone{i}", 100.0 + i)
    d.compact(is_live, live_count=0)
    assert len(d) == 0


def test_deadline_is_checked_when_a_request_would_be_dispatched() -> None:
    f = Fleet()
    w = f.ready("w", capacity=1)
    f.generate(rid="busy")
    f.generate(rid="short", timeout_s=0.5)
    f.generate(rid="next")
    f.clock.advance(1.0)  # no tick: the slot frees first
    outs = f.done(rid="busy")
    assert dispatched(outs) == [(w, f.key(rid="next"))]  # the expired one is not sent to the worker
    end = f.terminal(rid="short")
    assert end["type"] == "error" and end["code"] == TIMEOUT
    f.done(rid="next")
    f.check()


def test_the_actor_learns_when_the_next_deadline_falls() -> None:
    f = Fleet()
    f.ready("w", capacity=1)
    assert f.state.next_deadline_s() == math.inf
    f.generate(rid="long", timeout_s=30.0)
    f.generate(rid="short", timeout_s=0.001)
    assert f.state.next_deadline_s() == pytest.approx(T0 + 0.001)
    f.clock.advance(0.0005)
    assert f.record(f.state.expire()) == []
    f.clock.advance(0.0006)
    outs = f.record(f.state.expire())
    assert [body_map(o)["code"] for o in outs] == [TIMEOUT]  # queued: no worker to tell
    assert f.state.next_deadline_s() == pytest.approx(T0 + 30.0)


def test_a_timeout_tells_the_worker_why() -> None:
    f = Fleet()
    w = f.ready("w", capacity=1)
    f.generate(rid="r", timeout_s=1.0)
    f.tick(1.0)
    (cancel,) = worker_outs(f.sent, Cancel)
    assert cancel.identity == w and cancel.body.reason == CANCEL_TIMEOUT
    f.cancel(rid="r")  # the client's own cancel after its timeout: nothing more is sent
    assert len(worker_outs(f.sent, Cancel)) == 1
    f.done(rid="r", finish_reason="cancelled")
    assert f.state.requests == {}
    f.check()


# ---- clients that go away ------------------------------------------------------------------------------


def test_a_gone_client_gets_one_note_and_no_reply() -> None:
    f = Fleet()
    w = f.ready("w", capacity=2)
    for i in range(5):
        f.generate(b"quitter", f"q{i}", stream=False)
    f.generate(b"other", "o0")
    outs = f.gone(b"quitter")
    cancels = worker_outs(outs, Cancel)
    assert sorted(c.body.request_id for c in cancels) == sorted([f.key(b"quitter", "q0"), f.key(b"quitter", "q1")])
    assert all(c.body.reason == CANCEL_CLIENT_GONE and c.identity == w for c in cancels)
    assert f.to_client(b"quitter") == []  # nothing is sent to a client that is gone
    assert f.state.clients_gone == [ClientGone(b"quitter", "disconnected", 2, 3)]
    assert f.state.counters["abandoned"] == 5 and f.queued() == 1
    assert f.gone(b"quitter") == [] and len(f.state.clients_gone) == 1  # said once
    # Their dones free the slots; the other client's request goes next.
    assert dispatched(f.done(b"quitter", "q0", finish_reason="cancelled")) == [(w, f.key(b"other", "o0"))]
    assert dispatched(f.done(b"quitter", "q1", finish_reason="cancelled")) == []
    assert f.to_client(b"quitter") == [] and sum(f.state.replies.finished.values()) == 0  # no reply, none counted
    f.done(b"other", "o0")
    f.check()


def test_a_request_id_is_free_again_after_its_timeout_even_while_the_worker_finishes() -> None:
    f = Fleet()
    w = f.ready("w", capacity=2)
    f.generate(rid="same", timeout_s=1.0)
    old_key = f.key(rid="same")
    f.tick(1.0)
    f.generate(rid="same")  # reused once the first got its timeout
    new_key = f.key(rid="same")
    assert new_key != old_key
    f.from_worker(w, Error("internal", "late", old_key))  # the first one's late end
    assert f.state.by_client[(b"c1", "same")] == new_key


def test_refusals_are_labelled_with_a_served_model_only() -> None:
    f = Fleet()
    err = Error(BAD_REQUEST, "no", "r")
    for model in ("a", "nope", None, 7):
        f.state.count_refusal(model, err)
    assert f.state.replies.failed == {("a", BAD_REQUEST): 1, ("", BAD_REQUEST): 3}


# ---- connection events -> clients ----------------------------------------------------------------------

# Steps: ("seen", identity, fd), ("closed", fd, gone), ("accepted", fd, gone), ("forget", identity).
CONNECTION_CASES = [
    pytest.param([("seen", A, 7), ("seen", B, 8), ("closed", 7, [A]), ("closed", 7, [])], id="one client per connection"),
    pytest.param([("seen", A, 7), ("seen", A, 9), ("closed", 7, []), ("closed", 9, [A])],
                 id="a client that moved to a new connection is not gone when the old one drops"),
    pytest.param([("seen", A, 7), ("accepted", 7, [A]), ("seen", B, 7), ("closed", 7, [B])],
                 id="a reused descriptor ends what was mapped to it before"),
    pytest.param([("seen", A, -1), ("closed", -1, [])], id="no descriptor (inproc) is never mapped"),
    pytest.param([("seen", A, 7), ("forget", A), ("closed", 7, [])], id="forget"),
]


@pytest.mark.parametrize("steps", CONNECTION_CASES)
def test_connection_events_map_to_clients(steps: list[tuple]) -> None:
    c = ClientConnections()
    for step in steps:
        if step[0] == "seen":
            c.seen(step[1], step[2])
        elif step[0] == "forget":
            c.forget(step[1])
        else:
            got = c.closed(step[1]) if step[0] == "closed" else c.accepted(step[1])
            assert got == step[2], step
    assert all(c.fd_of[i] == fd for fd, ids in c.on_fd.items() for i in ids)
