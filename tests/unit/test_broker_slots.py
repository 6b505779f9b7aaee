"""A generate with n completions takes n of a worker's slots and counts n against the queue limit."""

from __future__ import annotations

import pytest

from actors.protocol import OVERLOADED
from tests.unit.broker_harness import Fleet, dispatched

pytestmark = pytest.mark.timeout(30)


def test_n_completions_take_n_slots() -> None:
    f = Fleet()
    w = f.ready("w", "a", capacity=4)
    assert dispatched(f.generate(rid="three", n=3)) == [(w, f.key(rid="three"))]
    assert f.state.workers[w].free == 1
    assert f.generate(rid="two", n=2) == [] and f.queued() == 1  # one slot left: it waits
    assert dispatched(f.generate(rid="one")) == [(w, f.key(rid="one"))]  # a single one fits beside
    assert f.state.workers[w].free == 0
    outs = f.done(rid="three")
    assert dispatched(outs) == [(w, f.key(rid="two"))] and f.state.workers[w].free == 1
    f.done(rid="two")
    f.done(rid="one")
    assert f.state.workers[w].free == 4 and f.state.workers[w].weights == {}
    f.check()


def test_n_counts_against_the_queue_limit() -> None:
    f = Fleet(queue_limit=4)
    assert f.generate(rid="a", n=3) == [] and f.queued() == 1  # no worker yet: queued
    assert f.refusal(f.generate(rid="b", n=2)) == OVERLOADED  # 3 + 2 > 4
    assert f.generate(rid="c") == []  # 3 + 1 fits
    assert f.state.models["a"].queue.sequences == 4
    f.fail_all()
    f.check()
