"""Unit tests for what the worker's I/O thread decides: heartbeats, reconnect backoff,
registration epochs, and how long the MLX loop has gone without progress.

Pure objects on a fake clock; no sockets, no threads, no sleeping.
"""

from __future__ import annotations

import pytest

from actors.clock import FakeClock
from workers.link import BrokerLink, LoopProgress, LoopReport

pytestmark = pytest.mark.timeout(10)


def make_link(interval_s: float = 1.0, liveness: int = 3) -> tuple[BrokerLink, FakeClock]:
    clock = FakeClock(0.0)
    link = BrokerLink(clock, interval_s=interval_s, liveness=liveness)
    link.connected()
    link.ready_sent(link.epoch)
    return link, clock


def run_until(link: BrokerLink, clock: FakeClock, t_s: float, actions: list[tuple[float, str]]) -> None:
    """Step the clock by 0.1 s, as the I/O thread's poll would wake, recording what became due."""
    while clock.now() < t_s:
        clock.advance(0.1)
        due = link.due()
        if due == BrokerLink.RECONNECT:
            link.connected()
            link.ready_sent(link.epoch)
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


def test_no_heartbeat_before_ready_and_one_new_epoch_per_registration_asked() -> None:
    clock = FakeClock(0.0)
    link = BrokerLink(clock, interval_s=1.0, liveness=5)
    first = link.connected()
    clock.advance(1.0)
    assert link.due() is None  # not registered: the broker would ignore a beat
    assert link.asked_to_register() is None  # a `ready` is owed already
    assert link.ready_sent(first) and link.registered
    second = link.asked_to_register()
    assert second == first + 1 and not link.registered
    assert link.asked_to_register() is None  # a burst of requests to register: one new epoch
    assert not link.ready_sent(first)  # the loop's ready for the old epoch is stale
    assert link.ready_sent(second)
    clock.advance(1.0)
    assert link.due() == BrokerLink.BEAT


def report(consumed: int, steps: int, began_s: float | None) -> LoopReport:
    return LoopReport(epoch=1, consumed=consumed, steps=steps, step_began_s=began_s)


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
