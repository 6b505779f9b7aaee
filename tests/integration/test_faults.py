"""Break the fleet on purpose: kill workers, hang them, kill the broker, crash-loop.

Heartbeats are short here (0.2 s x 3, hung_step_s 0.6 s) so detection takes well under a second.
Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from actors.config import BatchingConfig
from mlx_fleet.client import AsyncClient, Client, FleetError
from tests.integration.clients import RawClient, Tracker
from tests.integration.fleets import fleet_status, free_tcp_port, running_fleet, worker_row
from tests.integration.processes import FleetProcess, children_of, is_gone, write_config
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

INTERVAL_S = 0.2
FAST_BEATS: dict[str, Any] = {"heartbeat_interval_s": INTERVAL_S, "heartbeat_liveness": 3}
HUNG_STEP_S = 0.6  # demo steps take milliseconds; a frozen loop is caught fast


@pytest.fixture(autouse=True)
def one_blas_thread_per_worker(monkeypatch):
    """Two replicas on a 2-core box: spinning BLAS threads would starve each other's heartbeats."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def generate_map(rid: str, *, stream: bool, max_tokens: int, priority: str = "default") -> dict[str, Any]:
    """A generate request as the wire carries it."""
    return {"type": "generate", "request_id": rid, "model": "demo", "prompt": f"Request {rid}: tell a story",
            "max_tokens": max_tokens, "stream": stream, "priority": priority}


def assert_terminal_rules(tracker: Tracker, request_ids: list[str]) -> dict[str, str]:
    """Exactly one terminal each; no output seen -> done; an error only after output (worker_lost)."""
    outcome: dict[str, str] = {}
    for rid in request_ids:
        terms = tracker.terminals[rid]
        assert len(terms) == 1, f"{rid}: {len(terms)} terminal replies: {terms}"
        msg = terms[0]
        if msg["type"] == "error":
            assert msg["code"] == "worker_lost", f"{rid}: {msg}"
            assert tracker.chunks[rid] > 0, f"{rid} had no output yet it was not requeued: {msg}"
            outcome[rid] = "worker_lost"
        else:
            outcome[rid] = msg["finish_reason"]
    return outcome


@pytest.mark.slow
def test_chaos_kill9_one_of_two_workers():
    """32 in flight on 2 replicas, kill -9 one: one terminal each, requeue, restart within 5 s."""
    with running_fleet(models=(("demo", "demo", 2),), batching=BatchingConfig(decode_capacity=16),
                       restart_backoff_s=0.2, **FAST_BEATS) as fleet:
        addr = fleet.cfg.frontend
        raw = RawClient(addr)
        rids = [f"c{i}" for i in range(32)]
        tracker = Tracker(raw, rids)
        try:
            for i, rid in enumerate(rids):
                # Dispatch alternates between the replicas, so give each both kinds.
                raw.send(generate_map(rid, stream=i % 4 < 2, max_tokens=64))

            def streams_started() -> bool:
                tracker.pump()
                # 16 streams, 8 per replica: 12 started means both replicas have streamed output.
                return sum(1 for rid in rids if tracker.chunks[rid] > 0) >= 12

            wait_for(streams_started, timeout_s=30, what="streaming output from both replicas")
            victim = fleet.child("worker:demo-0")
            old_pid = victim.process.pid
            before = worker_row(fleet_status(addr), "demo-0")
            assert before is not None and before["in_flight"] > 0
            t_kill = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)

            served_again_s: float | None = None
            probes: list[str] = []
            while tracker.open() or served_again_s is None:
                assert time.monotonic() - t_kill < 90, f"still open: {tracker.open()}"
                tracker.pump(0.05)
                if served_again_s is None:
                    row = worker_row(fleet_status(addr), "demo-0")
                    if row is not None and row["pid"] != old_pid and row["served"] >= 1:
                        served_again_s = time.monotonic() - t_kill
                    elif not [p for p in probes if not tracker.terminals[p]]:
                        probe = f"probe{len(probes)}"  # urgent, short: goes first to a free slot
                        tracker.add(probe)
                        probes.append(probe)
                        raw.send(generate_map(probe, stream=False, max_tokens=1, priority="urgent"))
            wait_for(lambda: not tracker.open(), timeout_s=30, what="probe replies")
            tracker.settle()
            outcome = assert_terminal_rules(tracker, rids + probes)
            assert all(outcome[p] in ("stop", "length") for p in probes)
            lost = [r for r in rids if outcome[r] == "worker_lost"]
            assert lost and all(int(r[1:]) % 4 < 2 for r in lost), "streams cut by the kill end worker_lost, only they"
            assert served_again_s is not None and served_again_s <= 5.0, f"restarted worker served after {served_again_s}s"

            status = fleet_status(addr)
            print(f"chaos: served again after {served_again_s:.2f}s; outcomes "
                  f"{sorted(outcome.values()).count('worker_lost')} worker_lost; counters {status['counters']}")
            assert status["counters"]["requeued"] >= 1, status["counters"]
            assert status["requests"] == 0
            assert worker_row(status, "demo-0")["restarts"] == 1
            assert worker_row(status, "demo-1")["restarts"] == 0
            assert fleet.child("worker:demo-0").restarts == 1
        finally:
            raw.close()


@pytest.mark.slow
def test_hung_worker_is_declared_dead_and_replaced(monkeypatch):
    """A worker whose MLX loop freezes (fault switch) heartbeats on, yet is declared hung within
    hung_step_s plus one heartbeat, handled as a lost worker, then killed and replaced."""
    monkeypatch.setenv("MLX_FLEET_ENABLE_FAULTS", "1")
    monkeypatch.setenv("MLX_FLEET_FAULTS", "worker=demo-1,hang_after_dispatches=2")
    with running_fleet(models=(("demo", "demo", 2),), batching=BatchingConfig(decode_capacity=4),
                       hung_grace_s=1.0, restart_backoff_s=0.2, hung_step_s=HUNG_STEP_S, **FAST_BEATS) as fleet:
        addr = fleet.cfg.frontend
        hung_pid = fleet.child("worker:demo-1").process.pid
        raw = RawClient(addr)
        rids = [f"h{i}" for i in range(8)]
        tracker = Tracker(raw, rids)
        try:
            t0 = time.monotonic()
            for i, rid in enumerate(rids):
                raw.send(generate_map(rid, stream=i % 2 == 0, max_tokens=24))

            def declared_dead() -> bool:
                tracker.pump(0.0)
                return fleet_status(addr)["counters"]["workers_lost"] >= 1

            wait_for(declared_dead, timeout_s=10, interval_s=0.02, what="the hung worker declared dead")
            detect_s = time.monotonic() - t0
            # Bound: hung_step_s after the loop froze, plus one heartbeat, plus the hops and polling.
            assert detect_s <= HUNG_STEP_S + INTERVAL_S + 0.3, f"declared hung after {detect_s:.2f}s"
            (loss,) = fleet_status(addr)["recent_worker_losses"]
            assert loss["worker_id"] == "demo-1" and "no engine progress" in loss["reason"], loss
            assert fleet.child("worker:demo-1").process.pid == hung_pid, "it hangs; it has not exited"

            wait_for(lambda: (tracker.pump(), not tracker.open())[1], timeout_s=60, what="every terminal reply")
            tracker.settle()
            assert_terminal_rules(tracker, rids)
            assert fleet_status(addr)["requests"] == 0

            # The supervisor learns from the broker that the process is hung, kills and restarts it.
            def replaced() -> dict[str, Any] | None:
                row = worker_row(fleet_status(addr), "demo-1")
                return row if row and row["pid"] != hung_pid and row["state"] == "ready" else None

            row = wait_for(replaced, timeout_s=20, what="the hung worker replaced")
            assert row["restarts"] >= 1
        finally:
            raw.close()


@pytest.mark.slow
def test_broker_loss_under_load():
    """kill -9 the broker mid-stream: never a hang; the workers hand their requests to the new broker,
    and every stream finishes (tests/integration/test_broker_recovery.py checks the texts)."""
    with running_fleet(models=(("demo", "demo", 2),), restart_backoff_s=0.2, **FAST_BEATS) as fleet:
        addr = fleet.cfg.frontend
        results: dict[str, Any] = {}
        started = threading.Barrier(5, timeout=60)

        def sync_stream(name: str) -> None:
            try:
                with Client(addr, timeout_s=120) as client:
                    stream = client.stream("Tell a long story", model="demo", max_tokens=600)
                    for i, _ in enumerate(stream):
                        if i == 0:
                            started.wait()
                    results[name] = "finished"
            except FleetError as exc:
                results[name] = exc.code
                results[name + ":t"] = time.monotonic()

        async def async_streams() -> list[Any]:
            async with AsyncClient(addr, timeout_s=120) as client:
                async def one() -> Any:
                    try:
                        return await client.generate("Tell a long story", model="demo", max_tokens=600)
                    except FleetError as exc:
                        return (exc.code, time.monotonic())
                return await asyncio.gather(*(one() for _ in range(4)))

        import asyncio
        threads = [threading.Thread(target=sync_stream, args=(f"s{i}",)) for i in range(4)]
        async_result: list[Any] = []
        athread = threading.Thread(target=lambda: async_result.extend(asyncio.run(async_streams())))
        for t in threads + [athread]:
            t.start()
        started.wait()
        wait_for(lambda: fleet_status(addr)["requests"] >= 8, timeout_s=30, what="8 requests in flight")
        broker = fleet.child("broker")
        old_pid = broker.process.pid
        os.kill(old_pid, signal.SIGKILL)
        for t in threads + [athread]:
            t.join(120)
            assert not t.is_alive(), "a client hung after the broker died"
        assert all(results[f"s{i}"] == "finished" for i in range(4)), results
        assert all(item.finish_reason == "length" for item in async_result), async_result

        def reregistered() -> dict[str, Any] | None:
            try:
                st = fleet_status(addr, timeout_s=1.0)
            except FleetError:
                return None
            # Restarts show once the supervisor's next report reaches the new broker.
            ok = st["broker"]["pid"] != old_pid and st["broker"]["restarts"] == 1 and len(
                st["models"]["demo"]["workers"]) == 2 and all(w["state"] == "ready" for w in st["models"]["demo"]["workers"])
            return st if ok else None

        st = wait_for(reregistered, timeout_s=20, what="both workers re-registered with the new broker")
        assert [w["restarts"] for w in st["models"]["demo"]["workers"]] == [0, 0]
        with Client(addr, timeout_s=30) as client:
            assert client.generate("after the storm", model="demo", max_tokens=4).token_ids


@pytest.mark.slow
def test_crash_looping_worker_is_given_up_and_reported(monkeypatch, capsys):
    """Past restart_max restarts in restart_window_s a worker is given up; the rest keeps serving."""
    import asyncio

    from mlx_fleet.cli import main as cli_main

    monkeypatch.setenv("MLX_FLEET_ENABLE_FAULTS", "1")
    monkeypatch.setenv("MLX_FLEET_FAULTS", "worker=demo-1,exit_after_dispatches=1")
    with running_fleet(models=(("demo", "demo", 2),), restart_max=2, restart_window_s=120.0,
                       restart_backoff_s=0.1, **FAST_BEATS) as fleet:
        addr = fleet.cfg.frontend
        child = fleet.child("worker:demo-1")
        outcomes: list[str] = []

        async def wave() -> None:
            async with AsyncClient(addr, timeout_s=60) as client:
                async def one(i: int) -> str:
                    try:
                        return (await client.generate(f"wave {i}", model="demo", max_tokens=4)).finish_reason
                    except FleetError as exc:
                        return exc.code
                outcomes.extend(await asyncio.gather(*(one(i) for i in range(4))))

        def given_up() -> bool:
            asyncio.run(wave())  # each wave lands a dispatch on demo-1 whenever it is registered
            return child.gave_up

        wait_for(given_up, timeout_s=90, interval_s=0.2, what="the supervisor giving up on demo-1")
        assert child.restarts == 2 and not child.alive
        assert set(outcomes) <= {"stop", "length", "worker_lost"}, outcomes

        def reported() -> dict[str, Any] | None:
            row = worker_row(fleet_status(addr), "demo-1")
            return row if row is not None and row["state"] == "gave_up" else None

        row = wait_for(reported, timeout_s=10, what="status showing demo-1 given up")
        assert row["restarts"] == 2
        with Client(addr, timeout_s=30) as client:
            assert client.generate("still serving", model="demo", max_tokens=4).token_ids
        assert fleet.child("broker").alive and fleet.child("worker:demo-0").alive
        capsys.readouterr()
        assert cli_main(["status", "--connect", addr]) == 0
        table = capsys.readouterr().out
        line = next(ln for ln in table.splitlines() if "demo-1" in ln)
        assert "gave_up" in line and line.split()[-3] == "2", table  # restarts, then precision and BLAS


@pytest.mark.slow
def test_sigterm_drains_then_exits_zero(tmp_path, ipc_dir):
    """SIGTERM to `mlx-fleet up`: admission stops, short requests finish, long ones get an error, exit 0."""
    drain_s = 5.0
    addr = f"ipc://{ipc_dir}/front"
    config = write_config(tmp_path / "fleet.toml", frontend=addr, backend=f"ipc://{ipc_dir}/back",
                          metrics_events=f"ipc://{ipc_dir}/events", metrics_port=free_tcp_port(),
                          http_port=0, drain_timeout_s=drain_s, heartbeat_interval_s=0.2, heartbeat_liveness=3)
    up = FleetProcess("up", "--config", str(config), log_path=tmp_path / "up.log").start()
    proc = up.proc
    raw = RawClient(addr)
    try:
        up.wait_logged("fleet ready", 120, "`mlx-fleet up` ready")
        children = children_of(proc.pid)
        assert len(children) >= 2, children  # broker + worker

        short = [f"short{i}" for i in range(4)]
        long = [f"long{i}" for i in range(2)]
        tracker = Tracker(raw, short + long)
        for rid in short:
            raw.send(generate_map(rid, stream=True, max_tokens=150))
        for rid in long:
            raw.send(generate_map(rid, stream=True, max_tokens=30_000))
        wait_for(lambda: (tracker.pump(), all(tracker.chunks[r] for r in short + long))[1], timeout_s=30,
                 what="every request streaming")
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        late: list[str] = []

        def refused() -> bool:
            rid = f"late{len(late)}"
            tracker.add(rid)
            late.append(rid)
            raw.send(generate_map(rid, stream=True, max_tokens=4))
            tracker.pump(0.1)
            return any(t and t[0]["type"] == "error" and t[0]["code"] == "unavailable" for t in
                       (tracker.terminals[r] for r in late))

        wait_for(refused, timeout_s=5, interval_s=0.0, what="new requests refused while draining")
        wait_for(lambda: (tracker.pump(), not tracker.open())[1], timeout_s=drain_s + 10, what="every terminal reply")
        ended_s = time.monotonic() - t_term
        for rid in short:
            assert [m["type"] for m in tracker.terminals[rid]] == ["done"], tracker.terminals[rid]
        for rid in long:
            (msg,) = tracker.terminals[rid]
            assert msg["type"] == "error" and msg["code"] == "unavailable", msg
        assert ended_s <= drain_s + 3.0
        refusals = [tracker.terminals[r][0] for r in late if tracker.terminals[r][0]["type"] == "error"]
        assert all("shutting down" in m["message"] for m in refusals), refusals
        assert proc.wait(timeout=60) == 0, up.log()[-3000:]
        wait_for(lambda: all(is_gone(p) for p in children), timeout_s=5, what="no child process left")
    finally:
        raw.close()
        up.stop()
