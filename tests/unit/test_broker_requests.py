"""A request's life in the broker state: timeouts, cancel, request ids, draining, no worker."""

from __future__ import annotations

import pytest

from actors.protocol import (
    CANCELLED, DUPLICATE_REQUEST, TIMEOUT, UNAVAILABLE, Cancel, Disconnect, Dispatch, Error, Heartbeat,
)
from broker.status import make_status
from tests.unit.broker_harness import Fleet, dispatched, worker_outs

pytestmark = pytest.mark.timeout(30)


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
