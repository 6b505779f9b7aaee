"""The broker's last minute of replies per worker (broker/recent.py), on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from actors.clock import FakeClock
from broker.recent import RecentReplies

pytestmark = pytest.mark.timeout(30)


def done(ttft_s: float, completion: int = 10, prompt: int = 100, cached: int = 0) -> dict[str, Any]:
    return {"type": "done", "request_id": "k", "finish_reason": "stop",
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached},
            "timings": {"queue_s": 0.0, "ttft_s": ttft_s, "total_s": ttft_s + 1.0}}


def test_rates_percentiles_and_hit_rate_over_the_window() -> None:
    clock = FakeClock(100.0)
    recent = RecentReplies(clock, window_s=60.0)
    clock.advance(120.0)
    for i in range(10):
        recent.add("w0", done(0.1 * (i + 1), completion=12, cached=50 if i % 2 else 0))
    recent.add("w0", {"type": "error", "request_id": "k", "code": "timeout", "message": "late"})
    s = recent.summary(["w0"])
    assert (s["requests"], s["errors"], s["window_s"]) == (10, 1, 60.0)
    assert s["tok_per_s"] == pytest.approx(120 / 60.0)
    assert s["ttft_p50_s"] == pytest.approx(0.55) and s["ttft_p99_s"] == pytest.approx(0.991)
    assert s["cache_hit_rate"] == pytest.approx(250 / 1000)
    clock.advance(61.0)  # everything is older than the window now
    assert recent.summary(["w0"]) == {"window_s": 60.0, "requests": 0, "errors": 0, "tok_per_s": 0.0,
                                      "ttft_p50_s": None, "ttft_p99_s": None, "cache_hit_rate": None}


def test_a_young_broker_divides_by_its_age_and_models_sum_their_replicas() -> None:
    clock = FakeClock(0.0)
    recent = RecentReplies(clock)
    clock.advance(10.0)
    recent.add("w0", done(0.2, completion=30))
    recent.add("w1", done(0.4, completion=50))
    assert recent.summary(["w0"])["tok_per_s"] == pytest.approx(3.0)
    both = recent.summary(["w0", "w1", "gone"])
    assert both["tok_per_s"] == pytest.approx(8.0) and both["requests"] == 2


def test_no_token_no_ttft_and_bad_figures_are_ignored() -> None:
    recent = RecentReplies(FakeClock(0.0))
    recent.add("w", done(0.3, completion=0))  # cancelled before its first token
    recent.add("w", {"type": "done", "usage": "lots", "timings": {"ttft_s": True}})
    s = recent.summary(["w"])
    assert s["requests"] == 2 and s["ttft_p50_s"] is None


def test_bounded_per_worker_and_in_workers() -> None:
    recent = RecentReplies(FakeClock(0.0), max_samples=3, max_workers=2)
    for _ in range(5):
        recent.add("a", done(0.1))
    recent.add("b", done(0.1))
    recent.add("c", done(0.1))  # "a" replied longest ago: forgotten
    assert recent.summary(["a"])["requests"] == 0
    assert recent.summary(["b", "c"])["requests"] == 2


def test_percentiles_match_the_projects_definition_as_replies_come_and_go() -> None:
    import random

    from actors.stats import percentile

    clock = FakeClock(0.0)
    recent = RecentReplies(clock, window_s=10.0, max_samples=50)
    rng = random.Random(3)
    kept: list[tuple[float, float]] = []
    for _ in range(300):
        clock.advance(rng.uniform(0.0, 0.2))
        ttft = rng.uniform(0.0, 2.0)
        recent.add("w", done(ttft))
        kept = [(t, v) for t, v in kept if t >= clock.now() - 10.0][-49:] + [(clock.now(), ttft)]
        s = recent.summary(["w"])
        values = [v for _, v in kept]
        assert s["requests"] == len(values)
        assert s["ttft_p50_s"] == round(percentile(values, 50), 4) and s["ttft_p99_s"] == round(percentile(values, 99), 4)
