"""Unit tests for the collector's aggregation, event schema and rendering: no sockets, a fake clock."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from actors.clock import FakeClock
from actors.collector import FleetMetrics
from actors.collector_state import MAX_MODELS, CollectorState, DropCount, Histogram
from actors.metrics import (
    EVENT_TAG, ITL_BUCKETS_S, TTFT_BUCKETS_S, EventError, bucket_counts, decode_event, encode_event,
)
from actors.protocol import Done, Error, Generate, Ready
from broker.state import BrokerState
from broker.telemetry import make_broker_event

pytestmark = pytest.mark.timeout(10)


def event(kind: str, source: str = "worker:a-0", dropped: int = 0, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "source": source, "dropped": dropped, **fields}


def request_event(model: str = "a", *, ttft_s: float | None = 0.02, queue_s: float | None = 0.001,
                  e2e_s: float = 0.3, itl_s: tuple[float, ...] = (0.004, 0.006), **over: Any) -> dict[str, Any]:
    ev = event("request", model=model, worker=f"{model}-0", finish_reason="length", prompt_tokens=5,
               completion_tokens=len(itl_s) + 1, e2e_s=e2e_s, itl_counts=bucket_counts(itl_s, ITL_BUCKETS_S),
               itl_sum_s=sum(itl_s), **over)
    if ttft_s is not None:
        ev["ttft_s"] = ttft_s
    if queue_s is not None:
        ev["queue_s"] = queue_s
    return ev


def step_event(model: str = "a", **over: Any) -> dict[str, Any]:
    fields = dict(model=model, worker=f"{model}-0", batch_sizes=[1, 2, 2], steps=4, busy_s=0.02,
                  window_wait_s=[0.0, 0.0012], fast_path_admissions=1, admission_batch=8, window_s=0.001)
    fields.update(over)
    return event("step", **fields)


def broker_event(workers: dict[str, dict[str, str]], **models: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, ws in workers.items():
        m = {"queue_depth": 0, "running": 0, "workers": ws, "requests": {}, "errors": {},
             "prompt_tokens": 0, "generation_tokens": 0}
        m.update(models.get(name, {}))
        out[name] = m
    return event("broker", source="broker", models=out)


def make_state(models: tuple[str, ...] = ("a", "b")) -> tuple[CollectorState, FakeClock]:
    clock = FakeClock()
    return CollectorState(clock, models=list(models), broker_stale_s=5.0), clock


def scrape(state: CollectorState) -> dict[str, Any]:
    """Render through prometheus_client and parse it back: {sample name: {labels tuple: value}}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetMetrics(state.snapshot))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


# ---- histograms and binning ------------------------------------------------------------


@pytest.mark.parametrize("value, index", [
    (0.0, 0), (0.005, 0), (0.0051, 1), (60.0, len(TTFT_BUCKETS_S) - 1), (60.1, len(TTFT_BUCKETS_S)),
])
def test_bucket_bounds_are_inclusive_upper_bounds(value: float, index: int) -> None:
    h = Histogram(TTFT_BUCKETS_S)
    h.observe(value)
    assert h.counts[index] == 1 and h.count == 1


def test_cumulative_buckets_end_with_inf_and_total() -> None:
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [("1.0", 2.0), ("2.0", 3.0), ("+Inf", 4.0)]
    assert h.sum == 6.0


def test_itl_counts_binned_by_worker_fill_the_histogram_exactly() -> None:
    state, _ = make_state()
    itl = (0.0009, 0.001, 0.004, 0.2, 3.0)
    assert state.apply(request_event("a", itl_s=itl))
    direct = Histogram(ITL_BUCKETS_S)
    for v in itl:
        direct.observe(v)
    got = state.stats["a"].histograms["itl"]
    assert got.counts == direct.counts and got.sum == pytest.approx(direct.sum)


# ---- events into state -------------------------------------------------------------------


def test_request_events_fill_per_model_histograms() -> None:
    state, _ = make_state()
    for _ in range(3):
        state.apply(request_event("a"))
    state.apply(request_event("b", ttft_s=None, queue_s=None))  # cancelled before admission
    a, b = state.stats["a"].histograms, state.stats["b"].histograms
    assert (a["ttft"].count, a["queue"].count, a["e2e"].count, a["itl"].count) == (3, 3, 3, 6)
    assert (b["ttft"].count, b["queue"].count, b["e2e"].count) == (0, 0, 1)


def test_step_events_fill_batch_and_window_histograms_and_gauges() -> None:
    state, _ = make_state()
    state.apply(step_event())
    state.apply(step_event(admission_batch=4, window_s=0.002, fast_path_admissions=2))
    h = state.stats["a"].histograms
    assert h["batch_size"].count == 6 and h["batch_size"].sum == 10
    assert h["window_wait"].count == 4
    assert state.stats["a"].fast_path_admissions == 3
    g = state.workers["a-0"]
    assert (g.admission_batch, g.window_s, g.busy_s) == (4, 0.002, pytest.approx(0.04))


def test_step_events_add_engine_paths_and_time_split() -> None:
    state, _ = make_state()
    state.apply(step_event())  # a worker that reports no engine figures still counts
    state.apply(step_event(paths={"solo": 2, "batch": 1, "handoff": 1}, path_steps={"solo": 30, "batch": 12},
                           mlx_s=0.5, own_s=0.02))
    state.apply(step_event(paths={"batch": 3, "weird": 1}, path_steps={"batch": 5}, mlx_s=0.25, own_s=0.01))
    stats, g = state.stats["a"], state.workers["a-0"]
    assert stats.paths == {"solo": 2, "batch": 4, "handoff": 1, "other": 1}
    assert stats.path_steps == {"solo": 30, "batch": 17}
    assert (g.mlx_s, g.own_s) == (pytest.approx(0.75), pytest.approx(0.03))
    out = scrape(state)
    assert out["mlxfleet_engine_requests_total"][(("model", "a"), ("path", "batch"))] == 4
    assert out["mlxfleet_engine_requests_total"][(("model", "b"), ("path", "solo"))] == 0
    assert out["mlxfleet_engine_decode_steps_total"][(("model", "a"), ("path", "solo"))] == 30
    split = out["mlxfleet_engine_time_seconds_total"]
    assert split[(("model", "a"), ("part", "mlx_lm"), ("worker", "a-0"))] == pytest.approx(0.75)
    assert split[(("model", "a"), ("part", "own"), ("worker", "a-0"))] == pytest.approx(0.03)


@pytest.mark.parametrize("bad", [{"paths": {"solo": -1}}, {"path_steps": ["solo"]}, {"mlx_s": -0.1},
                                 {"own_s": "1"}])
def test_step_events_with_ill_typed_engine_figures_are_refused(bad: dict[str, Any]) -> None:
    state, _ = make_state()
    assert not state.apply_frames(encode_event(step_event(**bad)))
    assert state.malformed == 1


@pytest.mark.parametrize("reports, total", [
    ([0, 3, 5], 5),  # cumulative growth
    ([4, 1], 5),  # the sender restarted: its count started again from 0
    ([2, 2, 2], 2),
])
def test_drop_counts_fold_sender_restarts(reports: list[int], total: int) -> None:
    d = DropCount()
    for r in reports:
        d.update(r)
    assert d.total == total


@pytest.mark.parametrize("frames", [
    [b"garbage"],
    [b"MLXF1", msgpack.packb({"type": "step"})],
    [EVENT_TAG, b"\xc1"],
    [EVENT_TAG, msgpack.packb([1, 2])],
    [EVENT_TAG, msgpack.packb({"type": "teleport", "source": "x", "dropped": 0})],
    [EVENT_TAG, msgpack.packb({**request_event(), "prompt_tokens": -1})],
    [EVENT_TAG, msgpack.packb({**request_event(), "itl_counts": [1, 2]})],
    [EVENT_TAG, msgpack.packb({**request_event(), "e2e_s": float("nan")})],
    [EVENT_TAG, msgpack.packb({**request_event(), "surprise": 1})],
    [EVENT_TAG, msgpack.packb({**step_event(), "batch_sizes": [True]})],
    [EVENT_TAG, msgpack.packb(broker_event({"a": {"a-0": "sleepy"}}))],
    [EVENT_TAG, b"\x00" * (300 * 1024)],
])
def test_malformed_events_are_counted_and_dropped(frames: list[bytes]) -> None:
    state, _ = make_state()
    with pytest.raises(EventError):
        decode_event(frames)
    assert state.apply_frames(frames) is False
    assert state.malformed == 1 and state.received == 0


def test_encoded_events_round_trip() -> None:
    for ev in (request_event(), step_event(), broker_event({"a": {"a-0": "idle"}}),
               event("supervisor", source="supervisor", workers=[])):
        assert decode_event(encode_event(dict(ev))) == ev


def test_new_models_past_the_label_limit_are_dropped() -> None:
    state, _ = make_state(())
    for i in range(MAX_MODELS):
        assert state.apply(request_event(f"m{i}"))
    assert not state.apply(request_event("one-too-many"))
    assert state.over_limit == 1 and "one-too-many" not in state.stats


# ---- readiness and worker states ---------------------------------------------------------------


def test_ready_needs_a_registered_worker_for_every_configured_model() -> None:
    state, clock = make_state()
    ready, body = state.readiness()
    assert not ready and body["missing"] == ["a", "b"] and body["reason"] == "no broker report yet"
    state.apply(broker_event({"a": {"a-0": "idle"}, "b": {}}))
    ready, body = state.readiness()
    assert not ready and body["missing"] == ["b"]
    state.apply(broker_event({"a": {"a-0": "busy"}, "b": {"b-0": "full"}}))
    assert state.readiness() == (True, {"ready": True, "missing": [], "models": {
        "a": {"workers_ready": 1}, "b": {"workers_ready": 1}}})
    clock.advance(5.1)  # the broker went quiet: nothing is known to be ready
    ready, body = state.readiness()
    assert not ready and "no broker report" in body["reason"]


def test_worker_states_merge_broker_and_supervisor_views() -> None:
    state, _ = make_state()
    state.apply(broker_event({"a": {"a-0": "busy"}, "b": {}}))
    state.apply(event("supervisor", source="supervisor", workers=[
        {"worker": "a-0", "model": "a", "restarts": 0, "alive": True, "gave_up": False},
        {"worker": "a-1", "model": "a", "restarts": 2, "alive": True, "gave_up": False},
        {"worker": "b-0", "model": "b", "restarts": 5, "alive": False, "gave_up": True},
    ]))
    states = state.worker_states()
    assert states["a"] == {"idle": 0, "busy": 1, "full": 0, "starting": 1, "down": 0}
    assert states["b"] == {"idle": 0, "busy": 0, "full": 0, "starting": 0, "down": 1}


# ---- rendering ------------------------------------------------------------------------------


def test_scrape_renders_every_family_with_model_labels() -> None:
    state, _ = make_state()
    state.apply(request_event("a"))
    state.apply(step_event("b"))
    state.apply(broker_event({"a": {"a-0": "idle"}, "b": {"b-0": "idle"}, "": {}},
                             a={"requests": {"length": 1}, "prompt_tokens": 5, "generation_tokens": 3,
                                "queue_depth": 2},
                             **{"": {"errors": {"unknown_model": 2, "weird": 1}}}))
    got = scrape(state)
    assert got["mlxfleet_time_to_first_token_seconds_count"] == {(("model", "a"),): 1.0, (("model", "b"),): 0.0}
    assert got["mlxfleet_batch_size_count"][(("model", "b"),)] == 3.0
    assert got["mlxfleet_requests_total"][(("finish_reason", "length"), ("model", "a"))] == 1.0
    assert got["mlxfleet_requests_total"][(("finish_reason", "stop"), ("model", "b"))] == 0.0
    assert got["mlxfleet_request_errors_total"][(("code", "unknown_model"), ("model", ""))] == 2.0
    assert got["mlxfleet_request_errors_total"][(("code", "other"), ("model", ""))] == 1.0
    assert got["mlxfleet_prompt_tokens_total"] == {(("model", "a"),): 5.0, (("model", "b"),): 0.0}
    assert got["mlxfleet_generation_tokens_total"][(("model", "a"),)] == 3.0
    assert got["mlxfleet_queue_depth"][(("model", "a"),)] == 2.0
    assert got["mlxfleet_workers"][(("model", "b"), ("state", "idle"))] == 1.0
    assert got["mlxfleet_admission_batch_limit"] == {(("model", "b"), ("worker", "b-0")): 8.0}
    assert got["mlxfleet_batch_window_seconds"] == {(("model", "b"), ("worker", "b-0")): 0.001}
    assert got["mlxfleet_fast_path_admissions_total"][(("model", "b"),)] == 1.0
    assert got["mlxfleet_dropped_events_total"][(("reason", "malformed"), ("source", "collector"))] == 0.0


def test_stale_broker_gauges_are_left_out_but_counters_stay() -> None:
    state, clock = make_state()
    state.apply(broker_event({"a": {}, "b": {}}, a={"requests": {"stop": 4}}))
    clock.advance(10.0)
    got = scrape(state)
    assert "mlxfleet_queue_depth" not in got and "mlxfleet_requests_running" not in got
    assert got["mlxfleet_requests_total"][(("finish_reason", "stop"), ("model", "a"))] == 4.0


# ---- the broker's side, end to end through the schema ----------------------------------------------


def test_broker_event_counts_replies_tokens_and_worker_states() -> None:
    clock = FakeClock()
    broker = BrokerState(clock, models=["a", "b"])
    broker.handle_ready(b"w", Ready("a-0", "a", 2, 1, "h"))
    broker.handle_generate(b"c", Generate("r1", "a", prompt="x"))
    broker.handle_generate(b"c", Generate("r2", "nope", prompt="x"))
    raw = Done("b1", "stop", {"prompt_tokens": 7, "completion_tokens": 3}, {}).to_map()
    broker.handle_worker_message(b"w", Done("b1", "stop"), raw)
    broker.handle_generate(b"c", Generate("r3", "a", prompt="x"))
    broker.handle_worker_message(b"w", Error("internal", "boom", "b2"), Error("internal", "boom", "b2").to_map())
    broker.handle_generate(b"c", Generate("r4", "a", prompt="x"))
    ev = decode_event(encode_event(make_broker_event(broker) | {"type": "broker", "source": "broker", "dropped": 0}))
    a = ev["models"]["a"]
    assert a["requests"] == {"stop": 1} and a["errors"] == {"internal": 1}
    assert (a["prompt_tokens"], a["generation_tokens"], a["running"]) == (7, 3, 1)
    assert a["workers"] == {"a-0": "busy"}
    assert ev["models"][""]["errors"] == {"unknown_model": 1}
    assert ev["models"]["b"]["workers"] == {}


def test_routing_counts_travel_from_the_broker_to_the_scrape() -> None:
    from actors.prefix_keys import token_keys
    from actors.protocol import Prefixes

    clock = FakeClock()
    broker = BrokerState(clock, models=["a"])
    broker.handle_ready(b"w0", Ready("a-0", "a", 4, 1, "h"))
    broker.handle_ready(b"w1", Ready("a-1", "a", 4, 2, "h"))
    tokens = list(range(100))
    broker.handle_worker_message(b"w1", Prefixes("a-1", True, token_keys(tokens)), {})
    broker.handle_generate(b"c", Generate("r1", "a", prompt_tokens=tokens))  # six blocks held by a-1
    broker.handle_generate(b"c", Generate("r2", "a", prompt_tokens=[7] * 40))  # held nowhere
    ev = decode_event(encode_event(make_broker_event(broker) | {"type": "broker", "source": "broker", "dropped": 0}))
    assert ev["models"]["a"]["routed"] == {"affinity": 0, "prefix": 1, "least_loaded": 1, "imbalance": 0}
    state, _ = make_state(("a",))
    assert state.apply(ev)
    out = scrape(state)
    assert out["mlxfleet_routed_requests_total"][(("model", "a"), ("reason", "prefix"))] == 1
    assert out["mlxfleet_routed_requests_total"][(("model", "a"), ("reason", "least_loaded"))] == 1
    assert out["mlxfleet_routed_prefix_blocks_bucket"][(("le", "4.0"), ("model", "a"))] == 0
    assert out["mlxfleet_routed_prefix_blocks_bucket"][(("le", "8.0"), ("model", "a"))] == 1
    assert out["mlxfleet_routed_prefix_blocks_sum"][(("model", "a"),)] == 6
