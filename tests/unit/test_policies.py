"""Unit tests for workers.policies: batching windows and the auto-tuner, on a fake clock."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from actors.clock import FakeClock
from actors.config import BatchingConfig
from workers.policies import AdmissionPolicy, AutoTuner, Decision, make_auto_tuner, make_policy

pytestmark = pytest.mark.timeout(10)

T0 = 1000.0  # FakeClock's start; the oldest waiting request arrives then


def make(policy: str = "fixed", **overrides: Any) -> tuple[AdmissionPolicy, FakeClock]:
    clock = FakeClock(T0)
    # The seed's windows alone; the decode window has tests of its own below.
    cfg = dataclasses.replace(BatchingConfig(decode_window_ms=0.0), policy=policy, **overrides)
    return make_policy(cfg, clock), clock


def decide(
    pol: AdmissionPolicy,
    waiting: int,
    *,
    running: int = 0,
    free_slots: int = 16,
    first_arrival_s: float | None = T0,
    urgent: bool = False,
) -> Decision:
    return pol.decide(
        waiting=waiting,
        running=running,
        free_slots=free_slots,
        first_arrival_s=first_arrival_s,
        urgent_waiting=urgent,
    )


# -- fixed window ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("after_ms", "waiting", "running", "admit", "wait_ms", "reason"),
    [
        (0.0, 2, 0, 0, 1.0, "waiting"),
        (0.9, 2, 0, 0, 0.1, "waiting"),
        (1.0, 2, 0, 2, None, "window"),
        (5.0, 3, 0, 3, None, "window"),
        (0.5, 1, 2, 0, 0.5, "waiting"),  # decoding sequences do not change the window
        (1.0, 1, 2, 1, None, "window"),
        (0.0, 8, 0, 8, None, "full"),  # a full admission batch goes at once
        (0.0, 12, 0, 8, None, "full"),
    ],
)
def test_fixed_releases_at_full_batch_or_window(
    after_ms: float, waiting: int, running: int, admit: int, wait_ms: float | None, reason: str
) -> None:
    pol, clock = make("fixed", window_ms=1.0, admission_batch=8)
    clock.advance_ms(after_ms)
    d = decide(pol, waiting, running=running)
    assert (d.admit, d.reason, d.fast_path) == (admit, reason, False)
    if wait_ms is None:
        assert d.wait_s is None
    else:
        assert d.wait_s == pytest.approx(wait_ms / 1000.0)


def test_fixed_timeline_counts_waits() -> None:
    pol, clock = make("fixed", window_ms=1.0)
    steps = [(0.0, 2, 0), (0.4, 3, 0), (0.5, 3, 0), (0.1, 3, 3)]  # (advance_ms, waiting, admit)
    for advance_ms, waiting, admit in steps:
        clock.advance_ms(advance_ms)
        assert decide(pol, waiting).admit == admit
    assert pol.stats.decisions == 4
    assert pol.stats.window_waits == 3
    assert pol.stats.admitted == 3
    assert pol.stats.window_wait_s_total == pytest.approx(0.001)


# -- fast path ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fast_path", "waiting", "running", "admit", "reason", "counted"),
    [
        (True, 1, 0, 1, "fast_path", 1),
        (True, 1, 3, 0, "waiting", 0),  # something is decoding
        (True, 2, 0, 0, "waiting", 0),  # something else is waiting
        (False, 1, 0, 0, "waiting", 0),
    ],
)
def test_fast_path(fast_path: bool, waiting: int, running: int, admit: int, reason: str, counted: int) -> None:
    pol, _ = make("fixed", fast_path=fast_path)
    d = decide(pol, waiting, running=running)
    assert (d.admit, d.reason, d.fast_path) == (admit, reason, counted == 1)
    assert pol.stats.fast_path_admissions == counted


def test_fast_path_off_waits_then_releases_at_window() -> None:
    pol, clock = make("fixed", fast_path=False, window_ms=1.0)
    assert decide(pol, 1).wait_s == pytest.approx(0.001)
    clock.advance_ms(1.0)
    assert decide(pol, 1) == Decision(1, None, False, "window")


# -- immediate and urgent -------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "urgent", "waiting", "running", "free_slots", "admit", "reason"),
    [
        ("immediate", False, 3, 0, 16, 3, "immediate"),
        ("immediate", False, 1, 0, 16, 1, "immediate"),
        ("immediate", False, 2, 5, 16, 2, "immediate"),
        ("fixed", True, 3, 0, 16, 3, "urgent"),
        ("fixed", True, 3, 4, 1, 1, "urgent"),
        ("adaptive", True, 2, 1, 16, 2, "urgent"),
    ],
)
def test_immediate_and_urgent_skip_the_window(
    policy: str, urgent: bool, waiting: int, running: int, free_slots: int, admit: int, reason: str
) -> None:
    pol, _ = make(policy)
    d = decide(pol, waiting, running=running, free_slots=free_slots, urgent=urgent)
    assert d == Decision(admit, None, False, reason)


# -- adaptive window ------------------------------------------------------------------


CUSTOM = {
    "adaptive_low_ms": 5.0,
    "adaptive_medium_ms": 10.0,
    "adaptive_high_ms": 20.0,
    "adaptive_low_depth": 2,
    "adaptive_medium_depth": 4,
}


@pytest.mark.parametrize(
    ("policy", "overrides", "depth", "window_ms"),
    [
        ("adaptive", {}, 1, 0.75),
        ("adaptive", {}, 3, 1.0),
        ("adaptive", {}, 5, 1.0),
        ("adaptive", {}, 6, 2.0),
        ("adaptive", CUSTOM, 2, 5.0),
        ("adaptive", CUSTOM, 3, 10.0),
        ("adaptive", CUSTOM, 5, 20.0),
        ("fixed", {"window_ms": 3.0}, 6, 3.0),
        ("immediate", {}, 6, 0.0),
    ],
)
def test_window_follows_depth(policy: str, overrides: dict[str, Any], depth: int, window_ms: float) -> None:
    pol, clock = make(policy, **overrides)
    d = decide(pol, depth, running=1)  # running > 0: no fast path
    assert pol.window_ms == window_ms
    if window_ms == 0.0:
        assert d.admit == depth
        return
    assert (d.admit, d.wait_s) == (0, pytest.approx(window_ms / 1000.0))
    clock.advance_ms(window_ms)
    assert decide(pol, depth, running=1) == Decision(depth, None, False, "window")


# -- limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "waiting", "free_slots", "batch", "after_ms", "admit", "reason"),
    [
        ("fixed", 10, 3, 8, 0.0, 3, "full"),  # the batch cannot outgrow the free slots
        ("fixed", 10, 16, 4, 0.0, 4, "full"),
        ("fixed", 5, 16, 8, 1.0, 5, "window"),
        ("fixed", 5, 2, 8, 0.0, 2, "full"),
        ("adaptive", 7, 16, 3, 0.0, 3, "full"),
        ("immediate", 10, 3, 8, 0.0, 3, "immediate"),
        ("immediate", 10, 16, 4, 0.0, 4, "immediate"),
        ("fixed", 3, 0, 8, 5.0, 0, "no_capacity"),
        ("immediate", 3, 0, 8, 0.0, 0, "no_capacity"),
        ("fixed", 0, 16, 8, 0.0, 0, "idle"),
    ],
)
def test_never_exceeds_free_slots_or_admission_batch(
    policy: str, waiting: int, free_slots: int, batch: int, after_ms: float, admit: int, reason: str
) -> None:
    pol, clock = make(policy, admission_batch=batch)
    clock.advance_ms(after_ms)
    d = decide(pol, waiting, running=2, free_slots=free_slots)
    assert d == Decision(admit, None, False, reason)
    assert d.admit <= min(waiting, free_slots, batch)


def test_set_admission_batch_caps_admission() -> None:
    pol, _ = make("immediate", admission_batch=8)
    pol.set_admission_batch(3)
    assert (pol.admission_batch, decide(pol, 5).admit) == (3, 3)
    with pytest.raises(ValueError):
        pol.set_admission_batch(0)


def test_unknown_arrival_does_not_stall() -> None:
    pol, _ = make("fixed")
    assert decide(pol, 2, first_arrival_s=None).admit == 2


def test_make_policy_rejects_unknown_name() -> None:
    with pytest.raises(ValueError):
        make("sometimes")


# -- auto-tune ------------------------------------------------------------------------


def make_tuner(start: int, **overrides: Any) -> tuple[AdmissionPolicy, AutoTuner]:
    base = {"p99_threshold_ms": 100.0, "auto_tune_interval": 2, "auto_tune": True, "admission_batch": start}
    cfg = dataclasses.replace(BatchingConfig(), **{**base, **overrides})
    pol = make_policy(cfg, FakeClock(T0))
    tuner = make_auto_tuner(cfg, pol)
    assert tuner is not None
    return pol, tuner


@pytest.mark.parametrize(
    ("start", "batches_ms", "final", "ups", "downs", "emergencies", "ema_ms"),
    [
        (4, [[10, 20], [30]], 5, 1, 0, 0, 29.8),  # p99 of 10,20,30 well under 0.7 x target
        (4, [[150], [150]], 3, 0, 1, 0, 150.0),  # over target, under the emergency line
        (4, [[80], [80]], 4, 0, 0, 0, 80.0),  # between 0.7 x target and target: hold
        (4, [[10]], 4, 0, 0, 0, None),  # interval not over yet
        (8, [[250]], 4, 0, 0, 1, None),  # emergency: halve at once
        (5, [[250]], 2, 0, 0, 1, None),
        (3, [[250]], 2, 0, 0, 1, None),  # not below min
        (2, [[500], [500]], 2, 0, 0, 2, None),
        (8, [[10]] * 8, 8, 0, 0, 0, 10.0),  # not above max
        (2, [[150]] * 8, 2, 0, 0, 0, 150.0),  # not below min
        (4, [[10], [250], [10]], 2, 0, 0, 1, None),  # emergency restarts the interval
        (4, [[10], [250], [10], [10]], 3, 1, 0, 1, 10.0),
        (2, [[10]] * 6, 5, 3, 0, 0, 10.0),
        (8, [[150]] * 6, 5, 0, 3, 0, 150.0),
        (4, [[10], [], [10]], 5, 1, 0, 0, 10.0),  # an empty batch is ignored
    ],
)
def test_auto_tune_moves_within_bounds(
    start: int,
    batches_ms: list[list[float]],
    final: int,
    ups: int,
    downs: int,
    emergencies: int,
    ema_ms: float | None,
) -> None:
    pol, tuner = make_tuner(start)
    for batch in batches_ms:
        tuner.observe_batch([ms / 1000.0 for ms in batch])
        assert 2 <= pol.admission_batch <= 8
    assert pol.admission_batch == final
    assert (tuner.stats.ups, tuner.stats.downs, tuner.stats.emergencies) == (ups, downs, emergencies)
    assert tuner.ema_ms == (None if ema_ms is None else pytest.approx(ema_ms))


def test_auto_tune_ema_smooths_interval_p99() -> None:
    pol, tuner = make_tuner(4, auto_tune_interval=1, auto_tune_ema_alpha=0.3)
    steps = [(50.0, 50.0, 5), (150.0, 80.0, 5), (190.0, 113.0, 4)]  # (p99_ms, ema_ms, batch)
    for p99_ms, ema_ms, batch in steps:
        tuner.observe_batch([p99_ms / 1000.0])
        assert tuner.ema_ms == pytest.approx(ema_ms)
        assert pol.admission_batch == batch


def test_auto_tune_default_interval_is_ten_batches() -> None:
    pol, tuner = make_tuner(4, auto_tune_interval=10)
    for _ in range(9):
        tuner.observe_batch([0.010, 0.020])
    assert (tuner.ema_ms, pol.admission_batch) == (None, 4)
    tuner.observe_batch([0.010])
    assert pol.admission_batch == 5


def test_auto_tune_starts_inside_bounds_and_is_off_by_default() -> None:
    pol, _ = make_tuner(16)
    assert pol.admission_batch == 8
    off, _ = make("fixed")
    assert make_auto_tuner(BatchingConfig(), off) is None


@pytest.mark.parametrize(
    ("decode_window_ms", "running", "elapsed_ms", "admit"),
    [
        (0.0, 8, 1.0, 1),  # seed behaviour: the 1 ms window alone
        (20.0, 8, 1.0, 0),  # a full batch decoding: held for the whole decode window
        (20.0, 8, 19.9, 0),
        (20.0, 8, 20.0, 1),
        (20.0, 4, 9.9, 0),  # half full: half the hold
        (20.0, 4, 10.0, 1),
        (20.0, 1, 2.4, 0),  # one sequence of eight: a 2.5 ms hold
        (20.0, 1, 2.5, 1),
        (20.0, 0, 1.0, 1),  # idle engine: the decode window does not apply
    ],
)
def test_decode_window_holds_arrivals_only_while_decoding(decode_window_ms, running, elapsed_ms, admit):
    clock = FakeClock()
    cfg = BatchingConfig(policy="fixed", window_ms=1.0, decode_window_ms=decode_window_ms, fast_path=False,
                         decode_capacity=8)
    policy = make_policy(cfg, clock)
    arrival = clock.now()
    clock.advance_ms(elapsed_ms)
    d = policy.decide(waiting=1, running=running, free_slots=8, first_arrival_s=arrival, urgent_waiting=False)
    assert d.admit == admit
