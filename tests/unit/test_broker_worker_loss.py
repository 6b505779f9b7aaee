"""The broker state when a worker dies, goes silent, or comes back: requeue once, else worker_lost."""

from __future__ import annotations

import pytest

from actors.protocol import WORKER_LOST, Cancel, Chunk, Disconnect, Done, Error, Heartbeat, Message
from broker.records import Dest
from tests.unit.broker_harness import Fleet, dispatched, worker_outs

pytestmark = pytest.mark.timeout(30)


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
