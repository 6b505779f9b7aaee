"""The broker's queues: the per-model limit, priority with aging, and the PriorityQueue itself."""

from __future__ import annotations

import pytest

from actors.protocol import OVERLOADED
from broker.queue import PriorityQueue
from tests.unit.broker_harness import T0, Fleet, dispatched

pytestmark = pytest.mark.timeout(30)


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
