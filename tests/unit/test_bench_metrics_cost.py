"""The metrics-cost benchmark's in-process part runs against the worker telemetry as it is now.

It times ``WorkerTelemetry`` calls directly, so a change of their signatures breaks it
without any fleet test noticing (``on_step`` once took a batch size, a step time and a clock).
"""

from __future__ import annotations

import pytest

from benchmarks.metrics_cost import micro_costs

pytestmark = pytest.mark.timeout(30)


def test_micro_costs_times_each_telemetry_call() -> None:
    costs = micro_costs(20)
    assert set(costs) == {"request_event_us", "on_step_us", "flush_25_steps_us"}
    assert all(v > 0 for v in costs.values())
