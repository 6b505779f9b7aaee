"""The collector in a live fleet: scrape /metrics over HTTP after real requests, two models."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import EventSender
from mlx_fleet.client import AsyncClient, Client, Completion, FleetError
from tests.integration.clients import RawClient
from tests.integration.fleets import RunningFleet, make_config
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """(status, body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def parse(text: str) -> Samples:
    """{sample name: {sorted label items: value}} via prometheus_client's parser."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for key, v in samples.get(name, {}).items() if want <= set(key))


class MetricsFleet(RunningFleet):
    """A two-model fleet whose collector starts (and is checked) before anything else."""

    def __init__(self) -> None:
        cfg, ipc_dir = make_config(models=(("a", "demo", 1), ("b", "demo", 1)))
        super().__init__(cfg, ipc_dir)
        self.base_url = f"http://127.0.0.1:{cfg.metrics_port}"
        self.ready_before: tuple[int, dict[str, Any]] = (0, {})

    def scrape(self) -> Samples:
        status, text = http_get(self.base_url + "/metrics")
        return parse(text) if status == 200 else {}

    def start(self) -> "MetricsFleet":
        try:
            self.sup.children.start("collector")
            wait_for(lambda: http_get(self.base_url + "/health")[0] == 200, 60, "the collector's /health")
            status, body = http_get(self.base_url + "/ready")
            self.ready_before = (status, json.loads(body))
        except BaseException:
            self.sup.shutdown()
            raise
        super().start()  # broker and workers; the running collector is left alone
        return self


@pytest.fixture(scope="module")
def fleet():
    f = MetricsFleet().start()
    yield f
    f.stop()


def test_ready_is_503_before_workers_and_200_after(fleet: MetricsFleet) -> None:
    status, body = fleet.ready_before
    assert status == 503 and body["ready"] is False and body["missing"] == ["a", "b"]
    status, text = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(http_get(fleet.base_url + "/ready")),
                            30, "/ready to answer 200")
    assert json.loads(text) == {"ready": True, "missing": [], "models": {"a": {"workers_ready": 1},
                                                                           "b": {"workers_ready": 1}}}
    status, text = http_get(fleet.base_url + "/health")
    assert status == 200 and json.loads(text)["status"] == "ok"
    assert http_get(fleet.base_url + "/nope")[0] == 404


def test_openmetrics_is_served_when_asked_for(fleet: MetricsFleet) -> None:
    request = urllib.request.Request(fleet.base_url + "/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        content_type, text = reply.headers["Content-Type"], reply.read().decode()
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF") and "# TYPE mlxfleet_requests counter" in text


def test_counters_and_histograms_match_what_was_sent(fleet: MetricsFleet) -> None:
    before = fleet.scrape()
    sent = {"a": [("Hello", 8), ("The weather today is", 12), ("Tell me about queues.", 5)],
            "b": [("é ü € 日本", 7), ("Hi", 9)]}

    async def send_all() -> dict[str, list[Completion]]:
        async with AsyncClient(fleet.cfg.frontend, timeout_s=60) as client:
            results = await asyncio.gather(*(client.generate(p, model=m, max_tokens=n)
                                             for m, reqs in sent.items() for p, n in reqs))
        it = iter(results)
        return {m: [next(it) for _ in reqs] for m, reqs in sent.items()}

    done = asyncio.run(send_all())
    with Client(fleet.cfg.frontend, timeout_s=30) as client:
        done["a"].append(client.generate("Alone", model="a", max_tokens=4))  # nothing else waiting: fast path
        for bad in ({"model": "nope"}, {"model": "a", "max_tokens": 0}):
            with pytest.raises(FleetError):
                client.generate("x", **bad)

    def delta(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    def settled() -> Samples | None:
        now = fleet.scrape()
        for m, results in done.items():
            tokens = sum(r.usage["completion_tokens"] for r in results)
            if (delta(now, "mlxfleet_requests_total", model=m) != len(results)
                    or delta(now, "mlxfleet_e2e_request_latency_seconds_count", model=m) != len(results)
                    or delta(now, "mlxfleet_batch_size_sum", model=m) != tokens):
                return None
        if delta(now, "mlxfleet_request_errors_total", model="") != 1:
            return None
        if len(now.get("mlxfleet_worker_restarts_total", {})) != 2:  # the supervisor's report
            return None
        return now

    now = wait_for(settled, 30, "the scrape to count every request")
    for m, results in done.items():
        n = len(results)
        for reason in ("stop", "length", "cancelled"):
            want = sum(r.finish_reason == reason for r in results)
            assert delta(now, "mlxfleet_requests_total", model=m, finish_reason=reason) == want, (m, reason)
        assert delta(now, "mlxfleet_prompt_tokens_total", model=m) == sum(r.usage["prompt_tokens"] for r in results)
        gen_tokens = sum(r.usage["completion_tokens"] for r in results)
        assert delta(now, "mlxfleet_generation_tokens_total", model=m) == gen_tokens
        for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
            assert delta(now, f"mlxfleet_{hist}_count", model=m) == n, (m, hist)
            assert delta(now, f"mlxfleet_{hist}_bucket", model=m, le="+Inf") == n, (m, hist)
        assert delta(now, "mlxfleet_inter_token_latency_seconds_count", model=m) == gen_tokens - n
        assert delta(now, "mlxfleet_batch_window_wait_seconds_count", model=m) >= 1
        assert value(now, "mlxfleet_workers", model=m, state="idle") + value(now, "mlxfleet_workers", model=m,
                                                                               state="busy") >= 1
        assert value(now, "mlxfleet_admission_batch_limit", model=m, worker=f"{m}-0") == 8
        assert value(now, "mlxfleet_batch_window_seconds", model=m, worker=f"{m}-0") == pytest.approx(0.001)
    assert delta(now, "mlxfleet_request_errors_total", model="", code="unknown_model") == 1
    # A bad request that named a served model is labelled with it; only unknown models get model="".
    assert delta(now, "mlxfleet_request_errors_total", model="a", code="bad_request") == 1
    assert delta(now, "mlxfleet_request_errors_total", model="", code="bad_request") == 0
    assert delta(now, "mlxfleet_fast_path_admissions_total", model="a") >= 1
    assert now["mlxfleet_worker_restarts_total"] == {(("model", "a"), ("worker", "a-0")): 0.0,
                                                     (("model", "b"), ("worker", "b-0")): 0.0}
    models_seen = {dict(k).get("model") for name, series in now.items() for k in series if name.startswith("mlxfleet_")}
    assert models_seen <= {"a", "b", "", None}  # no label value from user input, none missing
    assert {"a", "b"} <= models_seen


def test_timeouts_and_vanished_clients_stay_out_of_the_latency_histograms(fleet: MetricsFleet) -> None:
    """A request that ends in `timeout`, or whose client vanished, never got a `done`: no latency is counted."""

    before = fleet.scrape()
    with Client(fleet.cfg.frontend, timeout_s=30) as client:
        for i in range(3):  # each times out while running on the worker
            with pytest.raises(FleetError) as info:
                client.generate(f"Tell a long story {i}", model="a", max_tokens=5000, timeout_s=0.3)
            assert info.value.code == "timeout"
        quitter = RawClient(fleet.cfg.frontend)
        quitter.send({"type": "generate", "request_id": "q", "model": "a", "prompt": "Tell a long story",
                      "max_tokens": 5000, "stream": False})
        wait_for(lambda: client.status()["models"]["a"]["running"] == 1, 30, "the vanishing client's request to run")
        quitter.close()
        wait_for(lambda: client.status()["requests"] == 0, 30, "the vanished client's request to end")
        last = client.generate("After", model="a", max_tokens=3)

    def delta(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, model="a", **labels) - value(before, name, model="a", **labels)

    # The worker's events arrive in order: once the last request is counted, the others would have been.
    def settled() -> Samples | None:
        now = fleet.scrape()
        counted = (delta(now, "mlxfleet_e2e_request_latency_seconds_count") >= 1
                   and delta(now, "mlxfleet_requests_total") >= 1  # the broker's counts come once a second
                   and delta(now, "mlxfleet_request_errors_total", code="timeout") == 3)
        return now if counted else None

    now = wait_for(settled, 30, "the last request and the timeouts to be counted")
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(now, f"mlxfleet_{hist}_count") == 1, hist
    assert delta(now, "mlxfleet_inter_token_latency_seconds_count") == last.usage["completion_tokens"] - 1
    assert delta(now, "mlxfleet_requests_total") == 1  # the vanished client's request got no reply: not counted
    assert delta(now, "mlxfleet_requests_total", finish_reason="cancelled") == 0


def test_a_refused_request_is_labelled_with_the_served_model_it_named(fleet: MetricsFleet) -> None:

    before = fleet.scrape()
    raw = RawClient(fleet.cfg.frontend)
    try:
        cases = [
            ({"model": "b", "prompt": "x", "max_tokens": 0}, "b"),  # a bad value
            ({"model": "b", "prompt_tokens": [1] * 131_073}, "b"),  # too large for the bounded decoder
            ({"model": "nope", "prompt": "x", "max_tokens": 0}, ""),  # not a served model: never a label
        ]
        for i, (fields, _) in enumerate(cases):
            reply = raw.call({"type": "generate", "request_id": f"bad{i}", **fields})
            assert reply["type"] == "error" and reply["code"] == "bad_request", reply
    finally:
        raw.close()

    def delta(samples: Samples, model: str) -> float:
        return (value(samples, "mlxfleet_request_errors_total", model=model, code="bad_request")
                - value(before, "mlxfleet_request_errors_total", model=model, code="bad_request"))

    now = wait_for(lambda: (lambda s: s if delta(s, "b") + delta(s, "") >= 3 else None)(fleet.scrape()), 30,
                   "the refusals to be counted")
    assert (delta(now, "b"), delta(now, "")) == (2, 1)
    assert "nope" not in {dict(k).get("model") for k in now["mlxfleet_request_errors_total"]}


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian package 'prometheus'; scripts/ci-setup-promtool.sh)")
def test_promtool_check_metrics_passes_on_a_live_scrape(fleet: MetricsFleet) -> None:
    status, text = http_get(fleet.base_url + "/metrics")
    assert status == 200 and "mlxfleet_requests_total" in text
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_killing_the_collector_neither_slows_nor_breaks_serving(fleet: MetricsFleet) -> None:
    child = fleet.child("collector")

    def timed_requests(n: int) -> list[float]:
        times_s = []
        with Client(fleet.cfg.frontend, timeout_s=30) as client:
            for i in range(n):
                t0 = time.perf_counter()
                assert client.generate(f"request {i}", model="a" if i % 2 else "b", max_tokens=8).token_ids
                times_s.append(time.perf_counter() - t0)
        return times_s

    base_s = statistics.median(timed_requests(6))
    old_pid = child.process.pid
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: not child.alive or child.process.pid != old_pid, 10, "the collector to die")
    during_s = statistics.median(timed_requests(6))
    still_down = child.process.pid == old_pid or not child.alive
    # Generous bound: the restarted collector competes for the same 2 cores.
    assert during_s <= 3 * base_s + 0.25, (base_s, during_s)

    wait_for(lambda: child.alive and child.process.pid != old_pid, 60, "the supervisor to restart the collector")
    assert child.restarts >= 1
    total = wait_for(lambda: value(fleet.scrape(), "mlxfleet_requests_total"), 30, "counters after the restart")
    assert total >= 6 + 6  # the broker's counts are cumulative, so they survive the collector
    if still_down:  # events sent while it was down were dropped, and the senders counted them
        wait_for(lambda: value(fleet.scrape(), "mlxfleet_dropped_events_total", reason="send_queue_full") > 0,
                 30, "dropped events to be reported")


# ---- the sender alone ---------------------------------------------------------------------------


def test_sender_without_collector_drops_and_never_blocks(ipc_dir: str) -> None:
    sender = EventSender(f"ipc://{ipc_dir}/nobody", "test")
    try:
        t0 = time.perf_counter()
        results = [sender.send("step", {"n": i}) for i in range(5000)]
        assert time.perf_counter() - t0 < 2.0
        assert not any(results) and sender.dropped == 5000
    finally:
        sender.close()


def test_sender_to_a_collector_that_never_reads_drops_once_full(ipc_dir: str) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVHWM, 10)
    pull.bind(f"ipc://{ipc_dir}/slow")
    sender = EventSender(f"ipc://{ipc_dir}/slow", "test", ctx=ctx, hwm=10)
    try:
        wait_for(lambda: sender.send("step", {"probe": True}), 10, "the sender to connect")
        t0 = time.perf_counter()
        payload = {"pad": "x" * 4096}
        for _ in range(20_000):
            sender.send("step", dict(payload))
        assert time.perf_counter() - t0 < 5.0
        assert sender.dropped > 0 and sender.sent < 20_000
    finally:
        sender.close()
        pull.close(0)
        ctx.term()
