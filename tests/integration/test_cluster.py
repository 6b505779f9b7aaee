"""The cluster end to end: several models, replicas, affinity, remote workers, CurveZMQ, load/unload.

Which worker served a request is read from the broker's per-worker ``served``
counters and its peak in-flight count, through ``status``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zmq

from actors.config import BatchingConfig, ModelSpec
from actors.curve import load_client_keys, make_keys
from mlx_fleet.client import AsyncClient, Client, Completion, FleetError
from tests.integration.clients import TAG, RawClient, pack
from tests.integration.fleets import RunningFleet, free_tcp_port, make_config, start_fleet, workers_of
from tests.integration.processes import FleetProcess, WorkerProcess, cli, write_config
from tests.waiting import assert_never, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPTS = [f"Question {i}: what do {topic} do?" for i, topic in enumerate(
    ["queues", "rivers", "lamps", "boats", "clocks", "bakers", "owls", "trains"])]
CAPACITY = 4
BUSY = (FleetError,)  # a status call may time out while the fleet is busy or coming up


def served(client: Client, model: str) -> dict[str, int]:
    return {wid: w["served"] for wid, w in workers_of(client, model).items()}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {wid: n - before.get(wid, 0) for wid, n in after.items()}


async def gather(frontend: str, jobs: list[tuple[str, str, dict[str, Any]]]) -> list[Completion]:
    """Run (model, prompt, options) jobs concurrently over one AsyncClient."""
    async with AsyncClient(frontend, timeout_s=120) as client:
        return await asyncio.gather(*(client.generate(p, model=m, **o) for m, p, o in jobs))


# ---- several models and replicas ---------------------------------------------------------


@pytest.fixture(scope="module")
def two_models():
    f = start_fleet(models=(("a", "demo", 2), ("b", "demo-small", 1)), heartbeat_interval_s=0.3,
                    batching=BatchingConfig(decode_capacity=CAPACITY, admission_batch=CAPACITY))
    yield f
    f.stop()


def test_two_models_at_once_each_request_reaches_its_model(two_models):
    with Client(two_models.cfg.frontend, timeout_s=120) as client:
        ref = {(m, p): client.generate(p, model=m, max_tokens=8).token_ids for m in "ab" for p in PROMPTS[:3]}
        before = {m: served(client, m) for m in "ab"}
    assert all(ref[("a", p)] != ref[("b", p)] for p in PROMPTS[:3])  # the two models answer differently
    jobs = [(m, p, {"max_tokens": 8}) for p in PROMPTS[:3] for m in "ab"] * 2
    results = asyncio.run(gather(two_models.cfg.frontend, jobs))
    for (m, p, _), got in zip(jobs, results):
        assert got.token_ids == ref[(m, p)], (m, p)
    with Client(two_models.cfg.frontend, timeout_s=30) as client:
        for m in "ab":
            assert sum(delta(served(client, m), before[m]).values()) == sum(1 for j in jobs if j[0] == m)


def test_two_replicas_share_64_concurrent_requests_within_capacity(two_models):
    with Client(two_models.cfg.frontend, timeout_s=30) as client:
        before = served(client, "a")
        tokens_before = sum(w["stats"].get("generated_tokens", 0) for w in workers_of(client, "a").values())
    jobs = [("a", PROMPTS[i % len(PROMPTS)] + f" #{i}", {"max_tokens": 8}) for i in range(64)]
    results = asyncio.run(gather(two_models.cfg.frontend, jobs))
    assert all(r.finish_reason in ("stop", "length") for r in results)
    with Client(two_models.cfg.frontend, timeout_s=30) as client:
        got = delta(served(client, "a"), before)
        assert len(got) == 2 and all(n > 0 for n in got.values()) and sum(got.values()) == 64, got
        generated = sum(r.usage["completion_tokens"] for r in results)
        # Heartbeats carry the engine's figures; wait until they include this burst.
        workers = wait_for(lambda: (lambda ws: ws if sum(w["stats"].get("generated_tokens", 0) for w in ws.values())
                                    >= tokens_before + generated else None)(workers_of(client, "a")),
                           10, "heartbeat stats after the burst", ignoring=BUSY)
    for w in workers.values():
        assert w["capacity"] == CAPACITY
        assert w["max_in_flight"] == CAPACITY  # the broker filled it, never past it
        assert w["stats"]["max_batch_size"] <= CAPACITY  # nor did the engine decode more at once


def test_affinity_requests_stay_on_one_replica(two_models):
    frontend = two_models.cfg.frontend
    with Client(frontend, timeout_s=30) as client:
        before = served(client, "a")
    asyncio.run(gather(frontend, [("a", p, {"max_tokens": 6, "affinity": "session-1"}) for p in PROMPTS]))
    with Client(frontend, timeout_s=30) as client:
        bound = delta(served(client, "a"), before)
        assert sorted(bound.values()) == [0, len(PROMPTS)], bound
        home = max(bound, key=bound.get)
        # Without a key the same burst spreads over both replicas.
        before = served(client, "a")
        asyncio.run(gather(frontend, [("a", p, {"max_tokens": 6}) for p in PROMPTS]))
        assert all(n > 0 for n in delta(served(client, "a"), before).values())
        before = served(client, "a")
        for p in PROMPTS[:3]:
            client.generate(p, model="a", max_tokens=4, affinity="session-1")
        assert delta(served(client, "a"), before)[home] == 3


# ---- remote workers and CurveZMQ -----------------------------------------------------------


@pytest.mark.slow
def test_a_worker_started_from_the_command_line_joins_and_serves(tmp_path: Path):
    fleet = start_fleet(transport="tcp", models=(("remote", "demo", 0),), heartbeat_interval_s=0.3)
    conf = write_config(tmp_path / "w.toml", heartbeat_interval_s=0.3)
    try:
        with WorkerProcess("--connect", fleet.cfg.backend, "--model", "remote=demo", "--worker-id", "remote-w",
                           "--config", str(conf), log_path=tmp_path / "w.log") as worker, \
                Client(fleet.cfg.frontend, timeout_s=120) as client:
            joined = wait_for(lambda: workers_of(client, "remote").get("remote-w"), 120, "the remote worker to register",
                              ignoring=BUSY)
            assert joined["pid"] == worker.proc.pid
            assert client.generate("Hello", model="remote", max_tokens=6).token_ids
            assert workers_of(client, "remote")["remote-w"]["served"] == 1
            assert worker.stop() == 0, worker.log()
            wait_for(lambda: "remote-w" not in workers_of(client, "remote"), 10, "the stopped worker to leave",
                     ignoring=BUSY)
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    made = make_keys(folder / "fleet")
    rogue = make_keys(folder / "rogue", ("rogue",))  # a valid key pair nobody authorised
    return {**made, **rogue}


def test_curve_serves_only_authorised_clients_and_workers(tmp_path: Path, keys):
    broker_public = str(keys["broker"][0])
    fleet = start_fleet(transport="tcp", models=(("demo", "demo", 1),), heartbeat_interval_s=0.3,
                        curve_server_secret=str(keys["broker"][1]),
                        curve_authorized_dir=str(keys["client"][0].parent / "authorized"))
    good = load_client_keys(str(keys["client"][1]), broker_public)
    rogue = load_client_keys(str(keys["rogue"][1]), broker_public)
    conf = write_config(tmp_path / "w.toml", heartbeat_interval_s=0.3)
    common = ("--connect", fleet.cfg.backend, "--model", "demo=demo", "--config", str(conf), "--curve-server-key", broker_public)
    try:
        with Client(fleet.cfg.frontend, timeout_s=60, curve=good) as client:
            assert client.generate("Hello", model="demo", max_tokens=4).token_ids  # the local worker got in too
        for curve in (rogue, None):
            with Client(fleet.cfg.frontend, timeout_s=3, curve=curve) as outsider:
                with pytest.raises(FleetError) as info:
                    outsider.generate("Hello", model="demo", max_tokens=4)
                assert info.value.code in ("unavailable", "timeout")
        assert_plain_dealer_gets_nothing(fleet.cfg.frontend)
        with WorkerProcess(*common, "--worker-id", "good-w", "--curve-secret", str(keys["worker"][1]),
                           log_path=tmp_path / "good.log"), \
                WorkerProcess(*common, "--worker-id", "rogue-w", "--curve-secret", str(keys["rogue"][1]),
                              log_path=tmp_path / "rogue.log"), \
                Client(fleet.cfg.frontend, timeout_s=60, curve=good) as client:
            wait_for(lambda: "good-w" in workers_of(client, "demo"), 120, "the authorised worker to register",
                     ignoring=BUSY)
            for i in range(4):  # equally free replicas take turns
                client.generate(f"Hello {i}", model="demo", max_tokens=4)
            assert workers_of(client, "demo")["good-w"]["served"] >= 1
            # Both started together; the rogue loaded as fast, yet never registers.
            assert_never(lambda: "rogue-w" in workers_of(client, "demo"), 3.0, "the unauthorised worker registering")
    finally:
        fleet.stop()


@pytest.mark.slow
def test_with_curve_the_supervisor_reports_restarts_and_the_gateway_serves(keys):
    """With CurveZMQ on, the supervisor's state reaches the broker and a local HTTP gateway serves with the local key."""
    good = load_client_keys(str(keys["client"][1]), str(keys["broker"][0]))
    fleet = start_fleet(transport="tcp", gateway=True, models=(("demo", "demo", 1),), heartbeat_interval_s=0.3,
                        restart_backoff_s=0.1, curve_server_secret=str(keys["broker"][1]),
                        curve_authorized_dir=str(keys["client"][0].parent / "authorized"))
    try:
        with Client(fleet.cfg.frontend, timeout_s=60, curve=good) as client:
            def reported() -> dict[str, Any] | None:
                st = client.status()
                return st if (st["supervisor"].get("children") and st["supervisor"]["connected"]) else None

            st = wait_for(reported, 30, "the supervisor's state in status", ignoring=BUSY)
            assert {"broker", "gateway", "worker:demo-0"} <= {c["name"] for c in st["supervisor"]["children"]}
            old_pid = fleet.child("worker:demo-0").process.pid
            os.kill(old_pid, signal.SIGKILL)

            def restarted() -> dict[str, Any] | None:
                rows = client.status()["models"]["demo"]["workers"]
                row = next((w for w in rows if w["worker_id"] == "demo-0"), None)
                return row if row and row["state"] == "ready" and row["pid"] != old_pid else None

            assert wait_for(restarted, 60, "demo-0 restarted and registered", ignoring=BUSY)["restarts"] == 1
        body = json.dumps({"model": "demo", "prompt": "Hello", "max_tokens": 4}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{fleet.cfg.http_port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["usage"]["completion_tokens"] >= 1
    finally:
        fleet.stop()


def assert_plain_dealer_gets_nothing(frontend: str) -> None:
    """A raw DEALER without CurveZMQ sends a request and hears nothing back."""
    raw = RawClient(frontend)
    try:
        try:
            raw.send_frames([TAG, pack({"type": "status", "request_id": "x"})], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # not even connected: nothing could be sent
        assert raw.recv(2.0) is None
    finally:
        raw.close()


# ---- runtime model management --------------------------------------------------------------


@pytest.fixture(scope="module")
def managed():
    from workers.models.sources import weights_bytes

    each = weights_bytes("demo")
    assert each
    cfg, ipc_dir = make_config(models=(("base", "demo", 1),), heartbeat_interval_s=0.3,
                               memory_budget_bytes=3 * each + each // 2)
    lazy = ModelSpec("lazy", "demo", 1, cfg.batching, on_demand=True, idle_unload_s=3.0)
    f = RunningFleet(dataclasses.replace(cfg, models=(*cfg.models, lazy)), ipc_dir).start()
    yield f
    f.stop()


def keep_busy(frontend: str, model: str, stop: threading.Event, outcomes: list[str]) -> None:
    """Send requests back to back until ``stop``; record each outcome."""
    with Client(frontend, timeout_s=60) as client:
        while not stop.is_set():
            try:
                outcomes.append(client.generate("background", model=model, max_tokens=4).finish_reason)
            except FleetError as exc:
                outcomes.append(f"error {exc}")


@pytest.mark.slow
def test_load_and_unload_on_a_live_fleet_without_failing_requests(managed):
    frontend = managed.cfg.frontend
    stop, background = threading.Event(), []
    busy = threading.Thread(target=keep_busy, args=(frontend, "base", stop, background), daemon=True)
    busy.start()
    try:
        done = cli("load", "extra=demo", "--replicas", "1", "--connect", frontend, "--timeout", "120", timeout_s=150)
        assert done.returncode == 0 and "1 replica(s) ready" in done.stdout, done.stderr
        inflight: list[tuple[float, Any]] = []

        def long_request(i: int) -> None:
            with Client(frontend, timeout_s=120) as c:
                try:
                    r: Any = c.generate(f"Long story {i}", model="extra", max_tokens=300)
                except FleetError as exc:
                    r = exc
                inflight.append((time.monotonic(), r))

        with Client(frontend, timeout_s=120) as client:
            assert client.generate("Hello", model="extra", max_tokens=4).token_ids
            threads = [threading.Thread(target=long_request, args=(i,), daemon=True) for i in range(6)]
            for t in threads:
                t.start()
            def all_held() -> bool:  # every one of the 6 reached the broker before the unload: none may fail
                extra = client.status()["models"]["extra"]
                return extra["running"] >= 3 and extra["running"] + extra["queue_depth"] >= 6

            wait_for(lambda: len(workers_of(client, "extra")) == 1 and all_held(), 30,
                     "the 6 requests held for extra, 3 running", ignoring=BUSY)
            reply = client.unload("extra", timeout_s=120)
            unloaded_s = time.monotonic()
            for t in threads:
                t.join(60)
            assert reply["workers"] == ["extra-0"]
            assert [type(r) for _, r in inflight] == [Completion] * 6, inflight  # every in-flight request finished
            assert all(r.finish_reason == "length" and t_s <= unloaded_s for t_s, r in inflight)
            with pytest.raises(FleetError) as info:
                client.generate("Hello", model="extra", max_tokens=4)
            assert info.value.code == "unknown_model"
            wait_for(lambda: "extra" not in client.status()["models"], 20, "extra to leave the status", ignoring=BUSY)
        wait_for(lambda: not any(c.name.startswith("worker:extra") for c in managed.sup.children), 20,
                 "the supervisor to drop extra's worker")
    finally:
        stop.set()
        busy.join(60)
    assert background and all(o in ("stop", "length") for o in background), background


def test_memory_budget_refuses_a_load_that_would_exceed_it(managed):
    with Client(managed.cfg.frontend, timeout_s=30) as client:
        with pytest.raises(FleetError) as info:
            client.load("big", "demo", replicas=3)
        assert info.value.code == "over_budget"
        assert "memory_budget_bytes" in info.value.message and "3 x" in info.value.message
        assert "big" not in client.status()["models"]
    refused = cli("load", "big=demo", "--replicas", "3", "--connect", managed.cfg.frontend, timeout_s=60)
    assert refused.returncode == 1 and "over_budget" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_on_demand_model_starts_at_its_first_request_and_stops_when_idle(managed):
    frontend = managed.cfg.frontend

    def lazy_children() -> list[Any]:
        return managed.sup.children.workers("lazy")

    with Client(frontend, timeout_s=120) as client:
        model = client.status()["models"]["lazy"]
        assert (model["state"], model["workers"], model["on_demand"]) == ("cold", [], True)
        assert not lazy_children()
        assert client.generate("Wake up", model="lazy", max_tokens=4).token_ids  # waits while it starts
        assert list(workers_of(client, "lazy")) == ["lazy-0"]
        wait_for(lambda: client.status()["models"]["lazy"]["state"] == "cold" and not workers_of(client, "lazy"),
                 30, "the idle on-demand worker to stop", ignoring=BUSY)
        wait_for(lambda: not lazy_children(), 20, "the supervisor to stop the idle worker")
        assert client.generate("Again", model="lazy", max_tokens=4).token_ids
        assert list(workers_of(client, "lazy")) == ["lazy-0.1"]
    gone = cli("unload", "lazy", "--connect", frontend, timeout_s=120)
    assert gone.returncode == 0, gone.stderr
    with Client(frontend, timeout_s=30) as client:
        with pytest.raises(FleetError) as info:
            client.generate("Hello", model="lazy", max_tokens=4)
        assert info.value.code == "unknown_model"


# ---- the command line --------------------------------------------------------------------------


@pytest.mark.slow
def test_up_serves_two_models_given_as_flags_and_status_shows_them(tmp_path: Path):
    front, back = f"ipc://{tmp_path}/f", f"ipc://{tmp_path}/b"
    # Metrics on, as by default, on private endpoints; no HTTP: this test speaks ZeroMQ only.
    env = {**os.environ, "MLX_METRICS_PORT": str(free_tcp_port()), "MLX_FLEET_METRICS_EVENTS": f"ipc://{tmp_path}/ev",
           "MLX_FLEET_HTTP_PORT": "0"}
    up = FleetProcess("up", "--model", "a=demo", "--model", "b=demo", "--replicas", "b=2", "--frontend", front,
                      "--backend", back, env=env, log_path=tmp_path / "up.log").start()
    try:
        with Client(front, timeout_s=60) as client:
            wait_for(lambda: len(workers_of(client, "a")) == 1 and len(workers_of(client, "b")) == 2, 120,
                     "a x1 and b x2 to register", ignoring=BUSY)
            before = {m: served(client, m) for m in "ab"}
            for m in "ab":
                assert client.generate("Hello", model=m, max_tokens=4).token_ids
            assert {m: sum(delta(served(client, m), before[m]).values()) for m in "ab"} == {"a": 1, "b": 1}
        table = cli("status", "--connect", front, timeout_s=60)
        assert table.returncode == 0 and "BLAS in use" in table.stdout
        assert all(w in table.stdout for w in ("a-0", "b-0", "b-1"))
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0, up.log()
    finally:
        up.stop()


def test_binding_a_public_address_without_curve_is_refused():
    done = cli("up", "--backend", "tcp://0.0.0.0:5999", "--model", "demo=demo", timeout_s=60)
    assert done.returncode == 2
    assert "refusing to bind tcp://0.0.0.0:5999 without CurveZMQ" in done.stderr and "--insecure" in done.stderr
