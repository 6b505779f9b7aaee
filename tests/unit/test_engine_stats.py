"""Unit tests for workers.engine.stats: step counters by path, and the mlx-lm/own split of busy time."""

from __future__ import annotations

import pytest

from actors.clock import FakeClock
from workers.engine.stats import PATHS, StepClock, StepStats

pytestmark = pytest.mark.timeout(10)


def test_record_step_counts_decode_steps_by_path() -> None:
    s = StepStats()
    for batch, solo in ((1, True), (1, True), (0, False), (3, False), (2, False)):
        s.record_step(batch, 0.01, solo=solo)
    assert (s.steps, s.decode_steps, s.solo_steps, s.batch_steps) == (5, 4, 2, 2)
    assert (s.sequences_decoded, s.generated_tokens, s.max_batch_size, s.last_batch_size) == (7, 7, 3, 2)
    assert s.mean_batch_size == pytest.approx(7 / 4) and s.busy_s == pytest.approx(0.05)


def test_as_dict_is_flat_and_names_every_path() -> None:
    s = StepStats()
    s.requests["handoff"] = 2
    d = s.as_dict()
    assert {f"requests_{p}" for p in PATHS} <= set(d) and d["requests_handoff"] == 2
    assert all(isinstance(v, (int, float)) for v in d.values())
    assert {"mlx_s", "own_s", "step_cycles", "solo_steps", "batch_steps", "handoffs"} <= set(d)


# Each script: a list of (action, ms). "open"/"step"/"close" mark the engine's calls,
# "mlx" is time inside mlx-lm, "own" is time outside it, "idle" is time with no work.
# Cycles: open..first step (admission), step..step, last step..close.
SCRIPTS = [
    # One busy period of two steps: insert, step (mlx 10, own 2), step (mlx 8, own 1), idle.
    ([("open", 0), ("mlx", 1), ("step", 0), ("mlx", 10), ("own", 2), ("step", 0), ("mlx", 8), ("own", 1),
      ("close", 0), ("idle", 50)], 3, 19.0, 3.0),
    # Idle time between busy periods never counts; nor does mlx-lm time spent while idle.
    ([("mlx", 5), ("idle", 20), ("open", 0), ("step", 0), ("mlx", 4), ("close", 0), ("idle", 30),
      ("open", 0), ("own", 1), ("step", 0), ("mlx", 3), ("own", 2), ("close", 0)], 4, 7.0, 3.0),
    # Admission work between steps is ours, an insert's mlx-lm call is mlx-lm's.
    ([("open", 0), ("step", 0), ("mlx", 6), ("own", 1), ("mlx", 2), ("own", 1), ("step", 0), ("close", 0)],
     3, 8.0, 2.0),
    # A second open while busy changes nothing.
    ([("open", 0), ("own", 1), ("open", 0), ("step", 0), ("mlx", 2), ("close", 0)], 2, 2.0, 1.0),
]


@pytest.mark.parametrize("script, cycles, mlx_ms, own_ms", SCRIPTS)
def test_step_clock_splits_busy_time(script: list[tuple[str, float]], cycles: int, mlx_ms: float,
                                     own_ms: float) -> None:
    clock, stats = FakeClock(), StepStats()
    timing = StepClock(clock, stats)
    for action, ms in script:
        if action == "mlx":
            with timing.mlx():
                clock.advance_ms(ms)
        elif action in ("own", "idle"):
            clock.advance_ms(ms)
        else:
            {"open": timing.open, "step": timing.step_started, "close": timing.close}[action]()
    assert not timing.busy
    assert stats.cycles == cycles
    assert stats.mlx_s * 1000 == pytest.approx(mlx_ms) and stats.own_s * 1000 == pytest.approx(own_ms)


def test_nested_mlx_blocks_count_once() -> None:
    clock, stats = FakeClock(), StepStats()
    timing = StepClock(clock, stats)
    timing.open()
    with timing.mlx():
        clock.advance_ms(2)
        with timing.mlx():
            clock.advance_ms(3)
    timing.close()
    assert stats.mlx_s * 1000 == pytest.approx(5) and stats.own_s == 0.0
