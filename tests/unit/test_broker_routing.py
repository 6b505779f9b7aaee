"""The broker state routes each request: by model, to the worker with the most free slots, with affinity."""

from __future__ import annotations

import pytest

from actors.protocol import UNKNOWN_MODEL, Disconnect, Dispatch
from broker.records import Out
from tests.unit.broker_harness import Fleet, dispatched, worker_outs

pytestmark = pytest.mark.timeout(30)


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
