"""Random schedules of clients, workers and time: the broker state answers every request exactly once."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.protocol import Chunk, Disconnect, Done, Error, Message
from tests.unit.broker_harness import Fleet

pytestmark = pytest.mark.timeout(30)


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
