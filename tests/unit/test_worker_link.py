"""Unit tests for what the worker's I/O thread decides: heartbeats, reconnect backoff,
registration, the grace of a lost broker, and how long the MLX loop has gone without progress.

Pure objects on a fake clock; no sockets, no threads, no sleeping.
"""

from __future__ import annotations

import pytest

from actors.clock import FakeClock
from workers.link import BrokerLink, LoopProgress, LoopReport

pytestmark = pytest.mark.timeout(10)


def make_link(interval_s: float = 1.0, liveness: int = 3, grace_s: float = 1000.0) -> tuple[BrokerLink, FakeClock]:
    clock = FakeClock(0.0)
    link = BrokerLink(clock, interval_s=interval_s, liveness=liveness, grace_s=grace_s)
    link.connected()
    link.ready_sent()
    return link, clock


def run_until(link: BrokerLink, clock: FakeClock, t_s: float, actions: list[tuple[float, str]]) -> None:
    """Step the clock by 0.1 s, as the I/O thread's poll would wake, recording what became due."""
    while clock.now() < t_s:
        clock.advance(0.1)
        due = link.due()
        if due == BrokerLink.RECONNECT:
            link.connected()
            link.ready_sent()
        if due is not None:
            actions.append((round(clock.now(), 6), due))


def reconnects(actions: list[tuple[float, str]]) -> list[float]:
    return [t for t, what in actions if what == BrokerLink.RECONNECT]


def test_reconnects_with_growing_backoff_and_resets_when_it_hears_the_broker() -> None:
    link, clock = make_link()
    actions: list[tuple[float, str]] = []
    run_until(link, clock, 60.0, actions)
    tries = reconnects(actions)
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert tries[0] == pytest.approx(3.0, abs=0.15)  # liveness x interval, then the first try
    assert all(b >= a for a, b in zip(gaps, gaps[1:])) and gaps[-1] >= 8.0, gaps
    link.heard()  # any message from the broker
    heard_at, count = clock.now(), len(tries)
    run_until(link, clock, heard_at + 2.9, actions)
    assert len(reconnects(actions)) == count  # quiet for less than liveness: no reconnect
    run_until(link, clock, heard_at + 4.2, actions)
    assert len(reconnects(actions)) == count + 1  # the backoff was reset: liveness plus one beat at most


def test_heartbeats_go_once_per_interval_while_the_broker_answers() -> None:
    link, clock = make_link(interval_s=0.5, liveness=5)
    beats = []
    for _ in range(40):  # 4 s
        clock.advance(0.1)
        link.heard()
        if link.due() == BrokerLink.BEAT:
            beats.append(round(clock.now(), 6))
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert len(beats) == 8 and all(0.5 - 1e-9 <= g <= 0.6 + 1e-9 for g in gaps), gaps  # late by one wake at most
    assert 0.0 < link.wait_s() <= 0.5


def register(link: BrokerLink) -> None:
    """What the I/O thread does: ask the loop, hear it answer, send ``ready``."""
    assert link.due() == BrokerLink.ASK_LOOP and not link.may_register()
    assert link.due() != BrokerLink.ASK_LOOP and link.wait_s() > 0  # asked once; no busy wait for the answer
    link.loop_ready(link.registration)
    assert link.may_register()
    link.ready_sent()


def test_registers_once_greeted_and_the_loop_answers_and_once_per_request_to_register() -> None:
    clock = FakeClock(0.0)
    link = BrokerLink(clock, interval_s=1.0, liveness=5)
    first = link.connected()
    clock.advance(1.0)
    assert link.due() is None and link.away  # no handshake yet: nothing to say, and a beat would be ignored
    assert not link.asked_to_register()  # a `ready` is owed already
    link.greet()
    register(link)
    clock.advance(1.0)
    assert link.registered and not link.away and link.due() == BrokerLink.BEAT
    assert link.asked_to_register() and link.away and link.epoch == first  # the same connection: no new epoch
    assert not link.asked_to_register()  # a burst of requests to register: one registration
    stale = link.registration - 1
    link.loop_ready(stale)  # the loop's answer to an older question does not count
    register(link)
    clock.advance(1.0)
    assert link.due() == BrokerLink.BEAT
    assert link.connected() == first + 1 and link.away and not link.greeted


def test_a_loop_that_never_answers_never_registers() -> None:
    clock = FakeClock(0.0)
    link = BrokerLink(clock, interval_s=1.0, liveness=1000)
    link.connected()
    link.greet()
    assert link.due() == BrokerLink.ASK_LOOP
    for _ in range(100):
        clock.advance(0.5)
        link.heard()
        assert link.due() in (None, BrokerLink.GIVE_UP) and not link.may_register()


@pytest.mark.parametrize("back_after_s, gives_up", [(4.9, False), (5.0, True)])
def test_a_lost_broker_is_given_up_on_after_the_grace_once(back_after_s: float, gives_up: bool) -> None:
    link, clock = make_link(interval_s=1.0, liveness=100, grace_s=5.0)
    clock.advance(10.0)
    link.heard()
    assert link.asked_to_register()  # lost: the grace runs from now
    assert link.wait_s() <= 5.0  # woken in time to give up
    link.connected()  # and again, from another cause: the grace still runs from the first
    clock.advance(back_after_s)
    assert (link.due() == BrokerLink.GIVE_UP) is gives_up
    assert link.due() != BrokerLink.GIVE_UP  # once
    link.greet()
    register(link)  # a broker that comes later gets what is left
    clock.advance(100.0)
    link.heard()
    assert link.due() != BrokerLink.GIVE_UP  # registered: no grace runs


def report(consumed: int, steps: int, began_s: float | None) -> LoopReport:
    return LoopReport(generation=0, consumed=consumed, steps=steps, step_began_s=began_s)


@pytest.mark.parametrize("events, now_s, elapsed_s", [
    ([], 5.0, 0.0),  # never handed anything: idle
    ([("hand", 1.0)], 4.0, 3.0),  # handed a dispatch at 1.0, not taken yet
    ([("hand", 1.0), ("report", 1, 0, None)], 4.0, 0.0),  # taken, and the loop waits again
    ([("hand", 1.0), ("report", 1, 0, 1.5)], 4.0, 2.5),  # taken; a step began at 1.5 and runs
    ([("hand", 1.0), ("report", 1, 0, 1.5), ("report", 1, 1, 2.0)], 4.0, 2.0),  # next step began at 2.0
    ([("report", 0, 3, 2.0), ("hand", 3.0)], 4.0, 2.0),  # busy since the step began, not the later item
    ([("hand", 1.0), ("hand", 2.0), ("report", 1, 0, None)], 4.0, 2.0),  # the second item still unread
])
def test_loop_progress_counts_from_the_oldest_unfinished_work(events: list[tuple], now_s: float,
                                                              elapsed_s: float) -> None:
    progress = LoopProgress()
    for event in events:
        if event[0] == "hand":
            progress.handed(event[1])
        else:
            progress.reported(report(*event[1:]))
    assert progress.elapsed_s(now_s) == pytest.approx(elapsed_s)


def test_loop_progress_reports_steps_completed() -> None:
    progress = LoopProgress()
    assert progress.handed(0.0) == 1 and progress.handed(0.0) == 2
    progress.reported(report(2, 7, None))
    assert progress.steps == 7 and progress.busy_since_s() is None
