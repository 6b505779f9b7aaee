"""Unit tests for broker.state and broker.queue: routing, queueing, liveness, on a fake clock.

Every test drives a :class:`Fleet` harness that records each ``Out`` the state
returns and checks the protocol's promise: every accepted ``generate`` gets
exactly one terminal message (``done`` or ``error``) and nothing after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.clock import FakeClock
from actors.protocol import (
    CANCELLED, DUPLICATE_REQUEST, OVERLOADED, TIMEOUT, UNAVAILABLE, UNKNOWN_MODEL, WORKER_LOST,
    Cancel, Chunk, Disconnect, Dispatch, Done, Error, Generate, Heartbeat, Message, Ready,
)
from broker.queue import PriorityQueue
from broker.records import Dest, Out
from broker.state import BrokerState
from broker.status import make_status

pytestmark = pytest.mark.timeout(30)

T0 = 1000.0
TERMINAL = ("done", "error")


def body_map(out: Out) -> dict[str, Any]:
    return out.body.to_map() if isinstance(out.body, Message) else dict(out.body)


@dataclass
class Event:
    kind: str  # accept | msg | gone
    client: bytes
    rid: str
    body: dict[str, Any] | None = None


class Fleet:
    """A BrokerState plus a record of everything it said; fake workers answer by hand."""

    def __init__(self, models: tuple[str, ...] = ("a", "b"), **kwargs: Any) -> None:
        self.clock = FakeClock(T0)
        self.state = BrokerState(self.clock, models=models, **kwargs)
        self.sent: list[Out] = []  # every Out except immediate refusals
        self.refusals: list[tuple[bytes, dict[str, Any]]] = []
        self.timeline: list[Event] = []
        self.keys: dict[tuple[bytes, str], str] = {}  # latest broker key per client request
        self.where: dict[str, bytes] = {}  # broker key -> worker of its latest dispatch

    # -- recording --------------------------------------------------------------------

    def record(self, outs: list[Out]) -> list[Out]:
        self.sent += outs
        for out in outs:
            body = body_map(out)
            if out.to is Dest.CLIENT:
                self.timeline.append(Event("msg", out.identity, body.get("request_id"), body))
            elif isinstance(out.body, Dispatch):
                self.where[out.body.request.request_id] = out.identity
        return outs

    # -- client side ------------------------------------------------------------------------

    def generate(self, client: bytes = b"c1", rid: str = "r1", model: str = "a", **fields: Any) -> list[Out]:
        msg = Generate(request_id=rid, model=model, prompt="hi", **fields)
        outs = self.state.handle_generate(client, msg)
        refusals = [o for o in outs if o.to is Dest.CLIENT]
        if refusals:
            assert len(outs) == 1 and isinstance(outs[0].body, Error)
            self.refusals.append((client, body_map(outs[0])))
            return outs
        self.timeline.append(Event("accept", client, rid))
        self.keys[(client, rid)] = self.state.by_client[(client, rid)]
        return self.record(outs)

    def refusal(self, outs: list[Out]) -> str:
        """The error code of an immediate refusal."""
        assert len(outs) == 1 and outs[0].to is Dest.CLIENT and isinstance(outs[0].body, Error)
        return outs[0].body.code

    def cancel(self, client: bytes = b"c1", rid: str = "r1") -> list[Out]:
        return self.record(self.state.handle_cancel(client, rid))

    def gone(self, client: bytes) -> list[Out]:
        outs = self.record(self.state.client_gone(client))
        self.timeline.append(Event("gone", client, ""))
        return outs

    # -- worker side ---------------------------------------------------------------------------

    def ready(self, wid: str, model: str = "a", capacity: int = 2) -> bytes:
        identity = wid.encode()
        msg = Ready(worker_id=wid, model=model, capacity=capacity, pid=100, host="h")
        self.record(self.state.handle_ready(identity, msg))
        return identity

    def from_worker(self, identity: bytes, msg: Message) -> list[Out]:
        return self.record(self.state.handle_worker_message(identity, msg, raw=msg.to_map()))

    def key(self, client: bytes = b"c1", rid: str = "r1") -> str:
        return self.keys[(client, rid)]

    def worker_of(self, client: bytes = b"c1", rid: str = "r1") -> bytes:
        return self.where[self.key(client, rid)]

    def chunk(self, client: bytes = b"c1", rid: str = "r1", text: str = "x") -> list[Out]:
        key = self.key(client, rid)
        return self.from_worker(self.where[key], Chunk(request_id=key, text=text, token_ids=[7]))

    def done(self, client: bytes = b"c1", rid: str = "r1", finish_reason: str = "stop") -> list[Out]:
        key = self.key(client, rid)
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        return self.from_worker(self.where[key], Done(request_id=key, finish_reason=finish_reason, usage=usage))

    def heartbeat(self, identity: bytes) -> list[Out]:
        return self.from_worker(identity, Heartbeat(worker_id=identity.decode(), in_flight=0, free_slots=1))

    def fail_all(self, message: str = "test over") -> list[Out]:
        return self.record(self.state.fail_all("internal", message))

    def tick(self, advance_s: float = 0.0) -> list[Out]:
        self.clock.advance(advance_s)
        return self.record(self.state.tick())

    # -- views ------------------------------------------------------------------------------------

    def to_client(self, client: bytes = b"c1", rid: str | None = None) -> list[dict[str, Any]]:
        return [e.body for e in self.timeline if e.kind == "msg" and e.client == client and (rid is None or e.rid == rid)]

    def terminal(self, client: bytes = b"c1", rid: str = "r1") -> dict[str, Any]:
        """The one terminal message of a request (asserts there is exactly one)."""
        ends = [m for m in self.to_client(client, rid) if m["type"] in TERMINAL]
        assert len(ends) == 1, ends
        return ends[0]

    def running(self, identity: bytes) -> int:
        return len(self.state.workers[identity].running)

    def queued(self, model: str = "a") -> int:
        return len(self.state.models[model].queue)

    # -- the promise --------------------------------------------------------------------------------

    def check(self, *, complete: bool = True) -> None:
        """Each accepted request gets exactly one terminal message and nothing after it.

        A client that went away may miss its terminal message, but then gets nothing
        more for that request. With ``complete=False`` requests may still be open.
        """
        open_: dict[tuple[bytes, str], int] = {}
        for e in self.timeline:
            if e.kind == "accept":
                assert not open_.get((e.client, e.rid)), f"accepted twice while open: {e}"
                open_[(e.client, e.rid)] = 1
            elif e.kind == "gone":
                for k in [k for k in open_ if k[0] == e.client]:
                    open_[k] = 0
            else:
                assert open_.get((e.client, e.rid)), f"message after the terminal one (or never accepted): {e}"
                assert e.body is not None and e.body["request_id"] == e.rid
                if e.body["type"] in TERMINAL:
                    open_[(e.client, e.rid)] = 0
                else:
                    assert e.body["type"] == "chunk", e.body
        if complete:
            still = [k for k, v in open_.items() if v]
            assert not still, f"requests without a terminal message: {still}"
        for w in self.state.workers.values():
            assert 0 <= len(w.running) <= w.capacity


def worker_outs(outs: list[Out], cls: type[Message] | None = None) -> list[Out]:
    return [o for o in outs if o.to is Dest.WORKER and (cls is None or isinstance(o.body, cls))]


def dispatched(outs: list[Out]) -> list[tuple[bytes, str]]:
    """(worker, broker key) of each Dispatch in ``outs``."""
    return [(o.identity, o.body.request.request_id) for o in worker_outs(outs, Dispatch)]


# ---- routing ------------------------------------------------------------------------------------


def test_routes_by_model_and_completes() -> None:
    f = Fleet()
    wa, wb = f.ready("wa", "a"), f.ready("wb", "b")
    outs = f.generate(rid="ra", model="a") + f.generate(rid="rb", model="b")
    assert [w for w, _ in dispatched(outs)] == [wa, wb]
    body = worker_outs(outs, Dispatch)[1].body
    assert body.request.model == "b" and body.request.request_id == f.key(rid="rb")
    assert body.request.request_id != "rb"  # the broker's own key goes to the worker
    f.chunk(rid="ra", text="he")
    f.done(rid="ra")
    f.done(rid="rb", finish_reason="length")
    assert [m["type"] for m in f.to_client(rid="ra")] == ["chunk", "done"]
    assert f.to_client(rid="ra")[0]["text"] == "he"
    assert f.terminal(rid="rb")["finish_reason"] == "length"
    assert f.running(wa) == f.running(wb) == 0
    assert f.state.requests == {} and f.state.by_client == {}
    f.check()


def test_unknown_model() -> None:
    f = Fleet()
    f.ready("wa", "a")
    assert f.refusal(f.generate(model="zzz")) == UNKNOWN_MODEL
    f.check()


def test_unconfigured_model_is_known_while_a_worker_serves_it() -> None:
    f = Fleet(models=("a",))
    wx = f.ready("wx", "x")
    assert dispatched(f.generate(rid="r1", model="x")) == [(wx, f.key(rid="r1"))]
    f.done(rid="r1")
    f.from_worker(wx, Disconnect(worker_id="wx", reason="bye"))
    assert f.refusal(f.generate(rid="r2", model="x")) == UNKNOWN_MODEL
    # A configured model with no worker yet queues instead.
    assert f.generate(rid="r3", model="a") == [] and f.queued("a") == 1
    f.fail_all()
    f.check()


def test_queue_limit_overloaded() -> None:
    f = Fleet(queue_limit=2)
    w = f.ready("w", capacity=1)
    f.generate(rid="run")  # running requests do not count against the queue
    assert f.running(w) == 1
    f.generate(rid="q1")
    f.generate(rid="q2")
    assert f.refusal(f.generate(rid="q3")) == OVERLOADED
    assert f.refusal(f.generate(rid="q4", model="a")) == OVERLOADED
    assert f.generate(rid="other", model="b") == []  # the limit is per model
    f.done(rid="run")  # q1 goes, so one more fits
    assert f.generate(rid="q5") == []
    assert f.queued() == 2
    f.fail_all()
    f.check()


@pytest.mark.parametrize(
    ("capacities", "expected"),
    [
        # Workers get ready one second apart; requests arrive one second apart, none finish.
        ([1, 1, 1], ["w0", "w1", "w2", None]),
        ([4, 2], ["w0", "w0", "w1", "w0", "w1", "w0", None]),  # most free, ties to least recently used
        ([2, 3], ["w1", "w0", "w1", "w0", "w1", None]),
        ([0, 1], ["w1", None]),
    ],
)
def test_most_free_slots_then_least_recently_used(capacities: list[int], expected: list[str | None]) -> None:
    f = Fleet()
    for i, cap in enumerate(capacities):
        f.ready(f"w{i}", capacity=cap)
        f.clock.advance(1.0)
    got: list[str | None] = []
    for i in range(len(expected)):
        d = dispatched(f.generate(rid=f"r{i}"))
        got.append(d[0][0].decode() if d else None)
        f.clock.advance(1.0)
    assert got == expected
    f.fail_all()
    f.check()


def test_least_recently_used_rotates_equal_workers() -> None:
    f = Fleet()
    for wid in ("w0", "w1", "w2"):
        f.ready(wid, capacity=2)
        f.clock.advance(1.0)
    order = []
    for i in range(6):
        order.append(dispatched(f.generate(rid=f"r{i}"))[0][0].decode())
        f.clock.advance(1.0)
        f.done(rid=f"r{i}")
    assert order == ["w0", "w1", "w2", "w0", "w1", "w2"]
    f.check()


def test_never_exceeds_capacity_and_fills_freed_slots() -> None:
    f = Fleet()
    w0, w1 = f.ready("w0", capacity=2), f.ready("w1", capacity=1)
    outs: list[Out] = []
    for i in range(10):
        outs += f.generate(rid=f"r{i}")
    assert len(dispatched(outs)) == 3 and f.queued() == 7
    assert (f.running(w0), f.running(w1)) == (2, 1)
    for i in range(10):
        f.check(complete=False)
        f.done(rid=f"r{i}")
        f.clock.advance(0.1)
    assert f.queued() == 0 and f.running(w0) == f.running(w1) == 0
    per_worker = {w: sum(1 for d in dispatched(f.sent) if d[0] == w) for w in (w0, w1)}
    assert sum(per_worker.values()) == 10
    f.check()


def test_zero_capacity_worker_gets_nothing() -> None:
    f = Fleet()
    f.ready("w0", capacity=0)
    assert f.generate() == [] and f.queued() == 1
    f.fail_all()
    f.check()


# ---- affinity --------------------------------------------------------------------------------


def test_affinity_sticks_while_alive_and_rebinds_after_death() -> None:
    f = Fleet()
    w0 = f.ready("w0", capacity=2)
    f.clock.advance(1)
    w1 = f.ready("w1", capacity=8)
    f.clock.advance(1)
    first = f.generate(rid="s1", affinity="sess")
    bound = dispatched(first)[0][0]
    assert bound == w1  # most free slots
    f.done(rid="s1")
    # Load w1 so w0 has more free slots; the session still goes to w1.
    for i in range(6):
        f.generate(rid=f"fill{i}")
    assert f.running(w1) > 0
    for i in range(2):
        f.clock.advance(1)
        assert dispatched(f.generate(rid=f"s{i + 2}", affinity="sess"))[0][0] == w1
    assert f.running(w1) == 8  # w1 is now full
    # Full bound replica: the session request waits; others still flow to w0.
    assert f.generate(rid="s4", affinity="sess") == []
    assert f.queued() == 1
    assert dispatched(f.generate(rid="plain"))[0][0] == w0
    assert dispatched(f.done(rid="fill0")) == [(w1, f.key(rid="s4"))]
    # A different session binds independently.
    assert dispatched(f.generate(rid="t1", affinity="other"))[0][0] == w0
    # w1 dies: its session rebinds to a live replica; the requeued requests go too.
    f.from_worker(w1, Disconnect(worker_id="w1", reason="crash"))
    f.clock.advance(1)
    w2 = f.ready("w2", capacity=16)
    d = dispatched(f.generate(rid="s5", affinity="sess"))
    assert d and d[0][0] in (w0, w2) and d[0][0] != w1
    rebound = d[0][0]
    assert dispatched(f.generate(rid="s6", affinity="sess"))[0][0] == rebound
    f.fail_all()
    f.check()


def test_affinity_is_per_model() -> None:
    f = Fleet()
    wa, wb = f.ready("wa", "a"), f.ready("wb", "b")
    assert dispatched(f.generate(rid="1", model="a", affinity="s"))[0][0] == wa
    assert dispatched(f.generate(rid="2", model="b", affinity="s"))[0][0] == wb
    f.done(rid="1")
    f.done(rid="2")
    f.check()


# ---- priority and aging -----------------------------------------------------------------------


def test_priority_order() -> None:
    f = Fleet()
    w = f.ready("w", capacity=1)
    f.generate(rid="busy")
    for rid, prio in [("bg", "background"), ("df", "default"), ("ur", "urgent"), ("df2", "default"), ("ur2", "urgent")]:
        f.generate(rid=rid, priority=prio)
    order = []
    current = "busy"
    for _ in range(5):
        d = dispatched(f.done(rid=current))
        assert len(d) == 1 and d[0][0] == w
        current = next(rid for (c, rid), key in f.keys.items() if key == d[0][1])
        order.append(current)
    assert order == ["ur", "ur2", "df", "df2", "bg"]
    f.done(rid=current)
    f.check()


@pytest.mark.parametrize(
    ("later", "gap_s", "first"),
    [
        # An old background request against a newer one; aging_s = 2, so a rank
        # step is worth 2 s of waiting.
        ("urgent", 0.0, "new"),
        ("urgent", 3.5, "new"),
        ("urgent", 4.5, "old"),  # waited more than 2 * aging_s: goes first
        ("default", 1.5, "new"),
        ("default", 2.5, "old"),
        ("background", 0.0, "old"),  # same class: arrival order
        ("background", 10.0, "old"),
    ],
)
def test_aging(later: str, gap_s: float, first: str) -> None:
    f = Fleet(aging_s=2.0, heartbeat_interval_s=100.0)
    f.ready("w", capacity=1)
    f.generate(rid="busy")
    f.generate(rid="old", priority="background")
    f.clock.advance(gap_s)
    f.generate(rid="new", priority=later)
    d = dispatched(f.done(rid="busy"))
    assert d == [(b"w", f.key(rid=first))]
    f.done(rid=first)
    f.done(rid="new" if first == "old" else "old")
    f.check()


def test_neither_class_starves() -> None:
    # One slot; a fresh urgent request arrives every second and each takes a second.
    f = Fleet(aging_s=2.0)
    f.ready("w", capacity=1)
    f.generate(rid="u0", priority="urgent")
    f.generate(rid="bg", priority="background")
    current, served_bg_at = "u0", None
    for i in range(1, 20):
        f.clock.advance(1.0)
        f.generate(rid=f"u{i}", priority="urgent")
        d = dispatched(f.done(rid=current))
        current = next(rid for (c, rid), key in f.keys.items() if key == d[0][1])
        if current == "bg":
            served_bg_at = i
    assert served_bg_at is not None and served_bg_at <= 6  # ~2 * aging_s, not never
    # And the urgent requests kept flowing around it.
    served = [rid for (w, key) in dispatched(f.sent) for (c, rid), k in f.keys.items() if k == key]
    assert served.index("bg") > 1 and len(served) == 20
    f.fail_all()
    f.check()


@pytest.mark.parametrize(
    ("pushes", "expected"),
    [
        ([("a", "background", 0.0), ("b", "urgent", 0.0)], ["b", "a"]),
        ([("a", "default", 0.0), ("b", "default", 0.0)], ["a", "b"]),
        ([("a", "background", 0.0), ("b", "urgent", 5.0)], ["a", "b"]),
        ([("a", "urgent", 3.0), ("b", "default", 0.0), ("c", "background", 0.0)], ["b", "a", "c"]),
    ],
)
def test_priority_queue_order(pushes: list[tuple[str, str, float]], expected: list[str]) -> None:
    q: PriorityQueue[str] = PriorityQueue(aging_s=2.0)
    for key, prio, at in pushes:
        q.push(key, key, prio, T0 + at)
    assert [k for k, _ in q.ordered()] == expected
    assert next(q.ordered()) == (expected[0], expected[0])
    assert q.remove(expected[0]) == expected[0] and expected[0] not in q
    assert q.remove(expected[0]) is None
    assert [k for k, _ in q.ordered()] == expected[1:] and len(q) == len(expected) - 1


def test_priority_queue_requeue_and_compaction() -> None:
    q: PriorityQueue[int] = PriorityQueue(aging_s=2.0)
    for i in range(200):
        q.push(f"k{i}", i, "default", T0 + i)
    for i in range(199):
        q.remove(f"k{i}")
    q.push("k0", 0, "default", T0)  # a requeue keeps its original arrival
    assert [k for k, _ in q.ordered()] == ["k0", "k199"]
    assert len(q) == 2 and sum(len(w) for t in q._classes for w in t.rotation.values()) == 2  # nothing left behind
    assert next(q.ordered()) == ("k0", 0)


# ---- worker loss ------------------------------------------------------------------------------


def test_requeue_once_then_worker_lost() -> None:
    f = Fleet()
    w0, w1 = f.ready("w0"), f.ready("w1")
    f.generate(rid="r1")
    first = f.worker_of(rid="r1")
    second = w1 if first == w0 else w0
    outs = f.from_worker(first, Disconnect(worker_id="x", reason="crash"))
    assert dispatched(outs) == [(second, f.key(rid="r1"))]
    assert f.to_client(rid="r1") == [] and f.state.counters["requeued"] == 1
    f.clock.advance(1)
    w2 = f.ready("w2")
    outs = f.from_worker(second, Disconnect(worker_id="y", reason="crash"))
    assert dispatched(outs) == []  # requeued once already
    err = f.terminal(rid="r1")
    assert (err["type"], err["code"], err["request_id"]) == ("error", WORKER_LOST, "r1")
    assert f.running(w2) == 0 and f.state.requests == {}
    f.check()


def test_streamed_request_is_not_requeued() -> None:
    f = Fleet()
    f.ready("w0")
    f.ready("w1")
    f.generate(rid="r1")
    f.generate(rid="r2")
    f.chunk(rid="r1")
    lost = f.worker_of(rid="r1")
    both_on_lost = f.worker_of(rid="r2") == lost
    outs = f.from_worker(lost, Disconnect(reason="crash"))
    assert f.terminal(rid="r1")["code"] == WORKER_LOST
    assert [m["type"] for m in f.to_client(rid="r1")] == ["chunk", "error"]
    if both_on_lost:
        assert len(dispatched(outs)) == 1
    f.done(rid="r2")
    f.check()


def test_requeued_request_waits_for_a_new_worker_and_keeps_its_place() -> None:
    f = Fleet()
    w0 = f.ready("w0", capacity=1)
    f.generate(rid="old", priority="default")
    f.clock.advance(1)
    f.generate(rid="new", priority="default")
    f.from_worker(w0, Disconnect(reason="crash"))
    assert f.queued() == 2
    w1 = f.ready("w1", capacity=1)
    assert f.worker_of(rid="old") == w1 and f.queued() == 1
    f.done(rid="old")
    f.done(rid="new")
    f.check()


def test_cancelled_running_request_is_not_requeued_when_its_worker_dies() -> None:
    f = Fleet()
    w0, w1 = f.ready("w0", capacity=1), f.ready("w1", capacity=1)
    f.generate(rid="r1")
    lost = f.worker_of(rid="r1")
    assert worker_outs(f.cancel(rid="r1"), Cancel)
    outs = f.from_worker(lost, Disconnect(reason="crash"))
    assert dispatched(outs) == []  # the client asked to stop: do not start it again
    end = f.terminal(rid="r1")
    assert (end["type"], end["finish_reason"]) == ("done", "cancelled")
    assert f.running(w0 if lost == w1 else w1) == 0
    f.check()


@pytest.mark.parametrize(("interval_s", "liveness"), [(1.0, 3), (0.5, 4), (2.0, 1)])
def test_worker_dead_after_silence(interval_s: float, liveness: int) -> None:
    f = Fleet(heartbeat_interval_s=interval_s, heartbeat_liveness=liveness)
    silence_s = interval_s * liveness
    w = f.ready("w", capacity=1)
    f.generate(rid="r1")
    f.tick(silence_s - 0.01)
    assert w in f.state.workers
    f.heartbeat(w)  # any message resets the countdown
    f.tick(silence_s - 0.01)
    assert w in f.state.workers
    f.chunk(rid="r1")
    f.tick(silence_s - 0.01)
    assert w in f.state.workers
    f.tick(0.02)
    assert w not in f.state.workers and f.state.counters["workers_lost"] == 1
    assert f.terminal(rid="r1")["code"] == WORKER_LOST
    # A message from the forgotten worker asks it to register again.
    outs = f.heartbeat(w)
    assert len(outs) == 1 and outs[0].identity == w and isinstance(outs[0].body, Disconnect)
    f.check()


def test_silent_worker_requeues_unstarted_work_to_a_live_one() -> None:
    f = Fleet()
    w0 = f.ready("w0", capacity=1)
    f.generate(rid="r1")
    f.clock.advance(2.0)
    w1 = f.ready("w1", capacity=1)
    f.clock.advance(1.5)  # w0 silent for 3.5 s, w1 for 1.5 s
    outs = f.tick()
    assert w0 not in f.state.workers and w1 in f.state.workers
    assert dispatched(outs) == [(w1, f.key(rid="r1"))]
    f.done(rid="r1")
    f.check()


@pytest.mark.parametrize(
    "msg",
    [
        Heartbeat(worker_id="ghost"),
        Chunk(request_id="b1", text="x"),
        Done(request_id="b1", finish_reason="stop"),
        Error(code="internal", message="x", request_id="b1"),
    ],
    ids=lambda m: m.TYPE,
)
def test_unknown_worker_gets_disconnect(msg: Message) -> None:
    f = Fleet()
    f.ready("w")
    f.generate(rid="r1")
    outs = f.from_worker(b"ghost", msg)
    assert len(outs) == 1 and outs[0].to is Dest.WORKER and outs[0].identity == b"ghost"
    assert isinstance(outs[0].body, Disconnect)
    assert f.to_client() == []
    f.done(rid="r1")
    f.check()


def test_unknown_worker_disconnect_is_ignored() -> None:
    f = Fleet()
    assert f.from_worker(b"ghost", Disconnect(reason="bye")) == []


def test_ready_again_requeues_what_it_held() -> None:
    f = Fleet()
    w = f.ready("w", capacity=1)
    f.generate(rid="r1")
    f.ready("w", capacity=1)  # restarted under the same identity
    assert [k for _, k in dispatched(f.sent)] == [f.key(rid="r1")] * 2
    assert f.running(w) == 1
    f.done(rid="r1")
    f.check()


def test_late_messages_from_a_previous_owner_are_ignored() -> None:
    f = Fleet()
    w0 = f.ready("w0", capacity=1)
    f.generate(rid="r1")
    key = f.key(rid="r1")
    f.from_worker(w0, Disconnect(reason="crash"))
    w1 = f.ready("w1", capacity=1)
    w0 = f.ready("w0", capacity=1)  # back, but r1 now runs on w1
    assert f.worker_of(rid="r1") == w1
    assert f.from_worker(w0, Chunk(request_id=key, text="stale")) == []
    assert f.from_worker(w0, Done(request_id=key, finish_reason="stop")) == []
    assert f.to_client() == []
    f.done(rid="r1")
    f.check()


# ---- timeouts ------------------------------------------------------------------------------------


def test_queued_request_times_out() -> None:
    f = Fleet(no_worker_timeout_s=1e9)
    f.generate(rid="r1", timeout_s=5.0)
    f.generate(rid="r2")  # default_timeout_s
    f.tick(4.5)
    assert f.to_client() == []
    f.tick(0.5)
    err = f.terminal(rid="r1")
    assert (err["type"], err["code"], err["request_id"]) == ("error", TIMEOUT, "r1")
    assert f.queued() == 1 and f.key(rid="r1") not in f.state.requests
    f.tick(600.0)
    assert f.terminal(rid="r2")["code"] == TIMEOUT
    assert f.queued() == 0 and f.state.requests == {}
    f.check()


def test_default_timeout_applies() -> None:
    f = Fleet(default_timeout_s=10.0, no_worker_timeout_s=1e9)
    f.generate(rid="r1")
    f.tick(9.5)
    assert f.to_client() == []
    f.tick(0.5)
    assert f.terminal(rid="r1")["code"] == TIMEOUT
    f.check()


def test_running_request_times_out_and_its_late_done_frees_the_slot() -> None:
    f = Fleet(heartbeat_interval_s=10.0)
    w = f.ready("w", capacity=1)
    outs = f.generate(rid="r1", timeout_s=5.0)
    assert worker_outs(outs, Dispatch)[0].body.request.timeout_s == pytest.approx(5.0)
    f.generate(rid="r2")
    f.chunk(rid="r1")
    f.heartbeat(w)
    outs = f.tick(5.0)
    cancels = worker_outs(outs, Cancel)
    assert len(cancels) == 1 and cancels[0].identity == w and cancels[0].body.request_id == f.key(rid="r1")
    assert f.terminal(rid="r1")["code"] == TIMEOUT
    assert f.running(w) == 1 and dispatched(outs) == []  # the slot is busy until the worker says so
    assert f.tick(1.0) == []  # no second timeout, no second cancel
    # The worker's answer to the cancel is swallowed, and frees the slot for r2.
    f.chunk(rid="r1")
    outs = f.done(rid="r1", finish_reason="cancelled")
    assert dispatched(outs) == [(w, f.key(rid="r2"))]
    assert [m["type"] for m in f.to_client(rid="r1")] == ["chunk", "error"]
    f.done(rid="r2")
    f.check()


def test_dispatch_carries_remaining_timeout_and_queue_time() -> None:
    f = Fleet()
    w = f.ready("w", capacity=1)
    f.generate(rid="busy")
    f.generate(rid="r1", timeout_s=10.0)
    f.clock.advance(4.0)
    outs = f.done(rid="busy")
    body = worker_outs(outs, Dispatch)[0].body
    assert body.request.timeout_s == pytest.approx(6.0)
    assert body.queue_s == pytest.approx(4.0)
    assert worker_outs(outs, Dispatch)[0].identity == w
    f.done(rid="r1")
    f.check()


# ---- cancel ------------------------------------------------------------------------------------------


def test_cancel_queued_answers_at_once() -> None:
    f = Fleet()
    f.generate(rid="r1")
    f.clock.advance(2.0)
    outs = f.cancel(rid="r1")
    assert worker_outs(outs) == []
    end = f.terminal(rid="r1")
    assert (end["type"], end["finish_reason"], end["request_id"]) == ("done", CANCELLED, "r1")
    assert end["usage"]["completion_tokens"] == 0 and end["timings"]["queue_s"] == pytest.approx(2.0)
    assert f.queued() == 0 and f.state.requests == {}
    assert f.cancel(rid="r1") == []  # already over
    assert f.cancel(rid="never") == []
    f.check()


def test_cancel_running_forwards_once_and_the_done_once() -> None:
    f = Fleet()
    w = f.ready("w", capacity=1)
    f.generate(rid="r1")
    f.generate(rid="r2")
    outs = f.cancel(rid="r1")
    assert len(outs) == 1 and outs[0].identity == w and outs[0].body == Cancel(request_id=f.key(rid="r1"))
    assert f.cancel(rid="r1") == []  # no second cancel
    assert f.to_client(rid="r1") == []  # the worker answers, not the broker
    f.chunk(rid="r1", text="partial")
    outs = f.done(rid="r1", finish_reason="cancelled")
    assert dispatched(outs) == [(w, f.key(rid="r2"))]
    assert f.terminal(rid="r1")["finish_reason"] == "cancelled"
    assert [m["type"] for m in f.to_client(rid="r1")] == ["chunk", "done"]
    f.done(rid="r2")
    f.check()


def test_worker_error_is_the_terminal_message() -> None:
    f = Fleet()
    w = f.ready("w", capacity=1)
    f.generate(rid="r1")
    key = f.key(rid="r1")
    f.from_worker(w, Error(code="internal", message="engine failed", request_id=key))
    err = f.terminal(rid="r1")
    assert (err["code"], err["message"], err["request_id"]) == ("internal", "engine failed", "r1")
    assert f.running(w) == 0
    f.check()


def test_client_gone() -> None:
    f = Fleet()
    w = f.ready("w", capacity=1)
    f.generate(b"c1", "run")
    f.generate(b"c1", "queued")
    f.generate(b"c2", "other")
    f.chunk(b"c1", "run")
    outs = f.gone(b"c1")
    cancels = worker_outs(outs, Cancel)
    assert [(o.identity, o.body.request_id) for o in cancels] == [(w, f.key(b"c1", "run"))]
    assert (b"c1", "queued") not in f.state.by_client and f.queued() == 1
    # Output for the gone client is dropped; its done frees the slot for c2.
    assert f.chunk(b"c1", "run") == []
    outs = f.done(b"c1", "run", finish_reason="cancelled")
    assert dispatched(outs) == [(w, f.key(b"c2", "other"))]
    assert [m["type"] for m in f.to_client(b"c1", "run")] == ["chunk"]
    assert f.gone(b"c1") == []
    f.done(b"c2", "other")
    assert f.state.requests == {}
    f.check()


# ---- ids, draining, no worker ----------------------------------------------------------------------


def test_same_request_id_from_two_clients() -> None:
    f = Fleet()
    f.ready("w", capacity=4)
    f.generate(b"c1", "x")
    f.generate(b"c2", "x")
    assert f.key(b"c1", "x") != f.key(b"c2", "x")
    f.chunk(b"c2", "x", text="two")
    f.chunk(b"c1", "x", text="one")
    f.done(b"c2", "x")
    assert [m["text"] for m in f.to_client(b"c1", "x") if m["type"] == "chunk"] == ["one"]
    assert [m["text"] for m in f.to_client(b"c2", "x") if m["type"] == "chunk"] == ["two"]
    f.cancel(b"c1", "x")
    f.done(b"c1", "x", finish_reason="cancelled")
    assert f.terminal(b"c1", "x")["finish_reason"] == "cancelled"
    assert f.terminal(b"c2", "x")["finish_reason"] == "stop"
    f.check()


def test_request_id_in_flight_is_refused_then_reusable() -> None:
    f = Fleet()
    f.ready("w", capacity=4)
    f.generate(rid="x")
    refused = f.generate(rid="x")
    assert f.refusal(refused) == DUPLICATE_REQUEST and refused[0].body.request_id == "x"
    assert f.to_client(rid="x") == []  # the refusal belongs to the second request; the first goes on
    f.done(rid="x")
    assert f.terminal(rid="x")["type"] == "done"
    assert dispatched(f.generate(rid="x"))  # a new request under the old id
    f.done(rid="x")
    f.check()


def test_draining() -> None:
    f = Fleet()
    w = f.ready("w", capacity=1)
    f.generate(rid="run")
    f.generate(rid="queued")
    f.state.stop_accepting()
    assert f.refusal(f.generate(rid="late")) == UNAVAILABLE
    assert not make_status(f.state)["accepting"]
    outs = f.done(rid="run")
    assert dispatched(outs) == [(w, f.key(rid="queued"))]  # queued work still runs
    f.done(rid="queued")
    assert f.state.requests == {}
    f.check()


def test_no_worker_timeout() -> None:
    f = Fleet(no_worker_timeout_s=60.0)
    f.clock.advance(30.0)
    f.generate(rid="r1")
    f.tick(29.5)
    assert f.to_client() == []
    f.tick(0.5)  # 60 s since the broker started with no worker for "a"
    err = f.terminal(rid="r1")
    assert (err["code"], err["request_id"]) == (UNAVAILABLE, "r1")
    assert f.queued() == 0 and f.state.requests == {}
    f.check()


def test_no_worker_timeout_counts_from_the_last_worker_loss() -> None:
    f = Fleet(no_worker_timeout_s=60.0, heartbeat_interval_s=100.0)
    f.clock.advance(100.0)
    w = f.ready("w", capacity=1)
    f.generate(rid="busy")
    f.generate(rid="r1")
    f.tick(50.0)
    assert f.to_client() == []  # a live worker: waiting is fine
    f.from_worker(w, Disconnect(reason="bye"))
    f.tick(59.0)
    assert f.to_client(rid="r1") == []
    f.tick(1.0)
    assert f.terminal(rid="r1")["code"] == UNAVAILABLE
    assert f.terminal(rid="busy")["code"] == UNAVAILABLE  # requeued, then no worker came
    f.check()


def test_fail_all_and_snapshot() -> None:
    f = Fleet()
    w = f.ready("w", capacity=1)
    f.generate(rid="run")
    f.generate(rid="queued")
    snap = make_status(f.state)
    assert snap["models"]["a"]["queue_depth"] == 1 and snap["models"]["a"]["running"] == 1
    assert snap["models"]["a"]["workers"][0]["worker_id"] == "w" and snap["requests"] == 2
    f.fail_all("broker stopping")
    assert {f.terminal(rid=r)["code"] for r in ("run", "queued")} == {"internal"}
    assert f.done(rid="run") == []  # the worker's late answer is swallowed
    assert f.running(w) == 0
    f.check()


def test_heartbeats_go_to_every_worker() -> None:
    f = Fleet()
    ws = {f.ready("w0"), f.ready("w1", "b")}
    outs = f.state.heartbeats()
    assert {o.identity for o in outs} == ws and all(isinstance(o.body, Heartbeat) for o in outs)


# ---- property: random schedules keep the promise ---------------------------------------------------

CLIENTS = (b"c0", b"c1")
WORKERS = ("w0", "w1", "w2")
OPS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "gen": st.tuples(
        st.just("gen"), st.sampled_from(CLIENTS), st.integers(0, 3), st.sampled_from(["a", "a", "b", "zzz"]),
        st.sampled_from(["urgent", "default", "background"]), st.sampled_from([None, None, 1.0, 5.0]),
        st.sampled_from([None, None, "s"]),
    ),
    "ready": st.tuples(st.just("ready"), st.sampled_from(WORKERS), st.sampled_from(["a", "a", "b"]), st.integers(0, 3)),
    "chunk": st.tuples(st.just("chunk"), st.sampled_from(WORKERS), st.integers(0, 5)),
    "done": st.tuples(st.just("done"), st.sampled_from(WORKERS), st.integers(0, 5)),
    "werror": st.tuples(st.just("werror"), st.sampled_from(WORKERS), st.integers(0, 5)),
    "cancel": st.tuples(st.just("cancel"), st.sampled_from(CLIENTS), st.integers(0, 3)),
    "tick": st.tuples(st.just("tick"), st.sampled_from([0.0, 0.5, 2.0, 4.0])),
    "heartbeat": st.tuples(st.just("heartbeat"), st.sampled_from(WORKERS)),
    "gone": st.tuples(st.just("gone"), st.sampled_from(CLIENTS)),
    "disconnect": st.tuples(st.just("disconnect"), st.sampled_from(WORKERS)),
    "drain": st.tuples(st.just("drain")),
}
# Weighted by repetition: mostly traffic, now and then a loss, a departure or a drain.
WEIGHTS = {"gen": 8, "ready": 3, "chunk": 5, "done": 5, "werror": 1, "cancel": 2, "tick": 3, "heartbeat": 2,
           "gone": 1, "disconnect": 1, "drain": 1}
op = st.sampled_from([k for k, n in WEIGHTS.items() for _ in range(n)]).flatmap(OPS.__getitem__)


def _apply(f: Fleet, step: tuple[Any, ...], gone: set[bytes]) -> None:
    kind = step[0]
    if kind == "gen":
        _, client, n, model, prio, timeout_s, affinity = step
        if client not in gone:
            f.generate(client, f"r{n}", model, priority=prio, timeout_s=timeout_s, affinity=affinity)
    elif kind == "ready":
        f.ready(step[1], step[2], step[3])
    elif kind in ("chunk", "done", "werror"):
        identity = step[1].encode()
        keys = sorted(f.state.workers[identity].running) if identity in f.state.workers else []
        key = keys[step[2] % len(keys)] if keys else f"b{step[2]}"  # else a stale or unknown key
        msg: Message
        if kind == "chunk":
            msg = Chunk(request_id=key, text="t")
        elif kind == "done":
            msg = Done(request_id=key, finish_reason="stop")
        else:
            msg = Error(code="internal", message="boom", request_id=key)
        f.from_worker(identity, msg)
    elif kind == "cancel":
        f.cancel(step[1], f"r{step[2]}")
    elif kind == "gone":
        gone.add(step[1])
        f.gone(step[1])
    elif kind == "tick":
        f.tick(step[1])
    elif kind == "disconnect":
        f.from_worker(step[1].encode(), Disconnect(reason="bye"))
    elif kind == "heartbeat":
        f.heartbeat(step[1].encode())
    else:
        f.state.stop_accepting()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=40))
def test_random_schedules_answer_every_request_exactly_once(steps: list[tuple[Any, ...]]) -> None:
    f = Fleet(heartbeat_interval_s=1.0, heartbeat_liveness=3, no_worker_timeout_s=6.0, queue_limit=3)
    gone: set[bytes] = set()
    for step in steps:
        _apply(f, step, gone)
        f.check(complete=False)
    # Let the workers finish what they hold, then let time run out for the rest.
    for identity, w in list(f.state.workers.items()):
        for key in sorted(w.running):
            f.from_worker(identity, Done(request_id=key, finish_reason="stop"))
    for _ in range(3):
        f.tick(700.0)
    f.check()
    assert all(rec.answered for rec in f.state.requests.values())
    assert f.state.by_client == {}
