"""Unit tests for workers.telemetry: few events, exact contents, nothing when disabled."""

from __future__ import annotations

from typing import Any

import pytest

from actors.clock import FakeClock
from actors.config import BatchingConfig
from actors.metrics import ITL_BUCKETS_S, bucket_counts, decode_event, encode_event
from workers.engine.stats import StepStats
from workers.policies import make_policy
from workers.telemetry import WorkerTelemetry

pytestmark = pytest.mark.timeout(10)


class RecordingSender:
    """Stands in for EventSender: keeps what it was given, as the collector would decode it."""

    enabled = True

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.closed = False

    def send(self, kind: str, fields: dict[str, Any]) -> bool:
        fields.update(type=kind, source="worker:a-0", dropped=0)
        self.events.append(decode_event(encode_event(fields)))  # must pass the collector's schema
        return True

    def close(self) -> None:
        self.closed = True


def make(flush_interval_s: float = 0.1) -> tuple[WorkerTelemetry, RecordingSender, Any]:
    sender = RecordingSender()
    policy = make_policy(BatchingConfig(), FakeClock())
    return WorkerTelemetry(sender, policy, model="a", worker="a-0", flush_interval_s=flush_interval_s), sender, policy


def test_steps_are_buffered_into_one_event_per_flush_interval() -> None:
    tel, sender, _ = make()
    t = 100.0
    tel.flush(t)
    sender.events.clear()
    stats = StepStats()
    for i in range(50):  # 50 steps of 4 ms: 0.2 s, so two flushes
        t += 0.004
        stats.record_step(3 if i else 0, 0.004, solo=False)
        tel.on_step(stats, now_s=t)
    assert len(sender.events) == 2
    sizes = [n for ev in sender.events for n in ev["batch_sizes"]]
    steps = sum(ev["steps"] for ev in sender.events)
    tel.flush(t)
    sizes += sender.events[-1]["batch_sizes"]
    steps += sender.events[-1]["steps"]
    assert steps == 50 and sizes == [3] * 49  # the prefill-only step decoded nothing


def test_fast_path_admissions_are_sent_as_increments() -> None:
    tel, sender, policy = make()
    policy.decide(waiting=1, running=0, free_slots=4, first_arrival_s=1000.0, urgent_waiting=False)
    tel.on_admit(0.0, 1.0)
    tel.flush(1.0)
    policy.decide(waiting=1, running=0, free_slots=4, first_arrival_s=1000.0, urgent_waiting=False)
    policy.decide(waiting=1, running=0, free_slots=4, first_arrival_s=1000.0, urgent_waiting=False)
    tel.flush(2.0)
    tel.flush(3.0)
    assert [ev["fast_path_admissions"] for ev in sender.events] == [1, 2, 0]
    assert sender.events[0]["window_wait_s"] == [0.0]
    assert sender.events[0]["admission_batch"] == 8 and sender.events[0]["window_s"] == pytest.approx(0.001)


def test_engine_paths_steps_and_time_split_are_sent_as_increments() -> None:
    tel, sender, _ = make()
    tel.flush(1.0)
    assert "paths" not in sender.events[-1]  # no engine step seen yet: nothing to report
    stats = StepStats()
    for solo in (True, True, False):
        stats.record_step(1, 0.01, solo=solo)
    stats.requests.update(solo=1, handoff=1)
    stats.mlx_s, stats.own_s = 0.03, 0.002
    tel.on_step(stats, 1.01)
    tel.flush(1.02)
    stats.record_step(2, 0.01, solo=False)
    stats.requests["batch"] += 2
    stats.mlx_s += 0.01
    tel.on_step(stats, 1.03)
    tel.flush(1.04)
    tel.flush(1.05)
    got = [(ev["paths"], ev["path_steps"], ev["mlx_s"], ev["own_s"]) for ev in sender.events[1:]]
    assert got == [({"solo": 1, "batch": 0, "handoff": 1}, {"solo": 2, "batch": 1}, 0.03, 0.002),
                   ({"solo": 0, "batch": 2, "handoff": 0}, {"solo": 0, "batch": 1}, pytest.approx(0.01), 0.0),
                   ({"solo": 0, "batch": 0, "handoff": 0}, {"solo": 0, "batch": 0}, 0.0, 0.0)]


def test_request_event_bins_inter_token_latencies() -> None:
    tel, sender, _ = make()
    itl = [0.004, 0.0049, 0.02, 0.7]
    tel.on_request(finish_reason="length", prompt_tokens=9, completion_tokens=5, queue_s=0.001, ttft_s=0.05,
                   e2e_s=0.9, itl_s=itl)
    (ev,) = sender.events
    assert ev["itl_counts"] == bucket_counts(itl, ITL_BUCKETS_S) and sum(ev["itl_counts"]) == 4
    assert ev["itl_sum_s"] == pytest.approx(sum(itl))
    assert (ev["ttft_s"], ev["queue_s"], ev["e2e_s"], ev["completion_tokens"]) == (0.05, 0.001, 0.9, 5)


def test_times_never_reached_are_left_out() -> None:
    tel, sender, _ = make()
    tel.on_request(finish_reason="cancelled", prompt_tokens=3, completion_tokens=0, queue_s=None, ttft_s=None,
                   e2e_s=0.2, itl_s=[])
    (ev,) = sender.events
    assert "ttft_s" not in ev and "queue_s" not in ev


def test_disabled_telemetry_sends_nothing() -> None:
    tel = WorkerTelemetry.disabled()
    tel.on_admit(0.1, 1.0)
    tel.on_step(StepStats(), 5.0)
    tel.on_request(finish_reason="stop", prompt_tokens=1, completion_tokens=1, queue_s=0.0, ttft_s=0.0,
                   e2e_s=0.0, itl_s=[])
    tel.close(6.0)
    assert tel.enabled is False
