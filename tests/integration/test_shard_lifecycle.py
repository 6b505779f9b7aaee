"""A sharded replica's lifecycle: a follower killed or stopped under load takes the group down and it
comes back; a group started through mlx.launch from a hostfile joins a broker and leaves it cleanly."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from tests.integration.clients import RawClient, Tracker
from tests.integration.fleets import fleet_status, worker_row
from tests.integration.reference import greedy_reference
from tests.integration.shards import (  # noqa: F401 (mt and one_blas_thread are fixtures)
    MODEL, PROMPTS, mt, one_blas_thread, sharded_fleet, stream_all,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def test_kill9_follower_under_load_restarts_the_group(mt):
    f = sharded_fleet()
    raw = RawClient(f.cfg.frontend)
    try:
        addr = f.cfg.frontend
        row = worker_row(fleet_status(addr), "s-0")
        old_pid, follower_pid = row["pid"], row["ranks"][1]["pid"]
        rids = [f"l{i}" for i in range(6)]
        tracker = Tracker(raw, rids)
        for i, rid in enumerate(rids):
            raw.send({"type": "generate", "request_id": rid, "model": "s", "prompt": f"Request {rid}: a story",
                      "max_tokens": 160, "stream": i % 2 == 0})

        def streaming() -> bool:
            tracker.pump()
            return sum(1 for rid in rids if tracker.chunks[rid] > 0) >= 2

        wait_for(streaming, timeout_s=60, what="streamed output from the sharded replica")
        os.kill(follower_pid, signal.SIGKILL)
        def all_answered() -> bool:
            tracker.pump()
            return not tracker.open()

        wait_for(all_answered, timeout_s=120, what="a reply to every request")
        tracker.settle()
        lost = []
        for rid in rids:
            terms = tracker.terminals[rid]
            assert len(terms) == 1, (rid, terms)
            msg = terms[0]
            if msg["type"] == "error":  # only a request that had streamed output is not requeued
                assert msg["code"] == "worker_lost" and tracker.chunks[rid] > 0, (rid, msg)
                lost.append(rid)
            else:
                assert msg["finish_reason"] in ("length", "stop"), (rid, msg)
        assert lost, "the streams cut by the kill end worker_lost"
        assert fleet_status(addr)["counters"]["requeued"] >= 1, "requests with no output yet were requeued"

        def restarted() -> dict[str, Any] | None:
            r = worker_row(fleet_status(addr), "s-0")
            return r if r and r["state"] == "ready" and r["pid"] != old_pid else None

        new = wait_for(restarted, timeout_s=120, what="the group to restart and register")
        assert new["restarts"] >= 1 and new["ranks"][1]["pid"] != follower_pid
        for pid in (old_pid, follower_pid):
            wait_for(lambda: not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
                     .lower(), timeout_s=10, what=f"pid {pid} of the old group to be gone")
        ids = mt[1].encode(PROMPTS[0])
        after, ends = stream_all(raw, {"after": ids}, 24)
        assert ends["after"]["type"] == "done" and after["after"] == greedy_reference(*mt, ids, 24)[0]

        # A follower that stops answering (SIGSTOP: alive, making no progress) leaves rank 0 waiting in a
        # collective; the followers' missing beats end rank 0, and the group is replaced again.
        stopped_pid = new["ranks"][1]["pid"]
        tracker.add("hang")
        raw.send({"type": "generate", "request_id": "hang", "model": "s", "prompt": "a long story", "max_tokens": 2000,
                  "stream": True})
        def hang_streaming() -> bool:
            tracker.pump()
            return tracker.chunks["hang"] > 0

        wait_for(hang_streaming, timeout_s=30, what="the stream to start")
        os.kill(stopped_pid, signal.SIGSTOP)
        wait_for(all_answered, timeout_s=60, what="a reply to the stream held by the stopped rank")
        assert [m.get("code") for m in tracker.terminals["hang"]] == ["worker_lost"]
        third = wait_for(lambda: (lambda r: r if r and r["state"] == "ready" and r["pid"] != new["pid"] else None)(
            worker_row(fleet_status(addr), "s-0")), timeout_s=120, what="the group to be replaced after the stall")
        assert third["ranks"][1]["pid"] != stopped_pid
        after, ends = stream_all(raw, {"after2": ids}, 24)
        assert ends["after2"]["type"] == "done" and after["after2"] == greedy_reference(*mt, ids, 24)[0]
    finally:
        raw.close()
        f.stop()


# ---- the command line ------------------------------------------------------------------------------

def test_a_group_started_by_mlx_launch_from_a_hostfile_joins_and_serves(tmp_path, mt):
    from mlx_fleet.client import Client
    from tests.integration.fleets import free_tcp_port, start_fleet, workers_of
    from tests.integration.processes import WorkerProcess, write_config

    fleet = start_fleet(transport="tcp", models=(("remote", MODEL, 0),), heartbeat_interval_s=0.3)
    conf = write_config(tmp_path / "w.toml", heartbeat_interval_s=0.3)
    hosts = tmp_path / "hosts.json"  # both ranks on this machine: mlx.launch runs 127.0.0.1 without ssh
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]))
    port = free_tcp_port()
    try:
        with WorkerProcess("--connect", fleet.cfg.backend, "--model", f"remote={MODEL}", "--worker-id", "sw",
                           "--shards", "2", "--hostfile", str(hosts), "--ring-port", str(port), "--config", str(conf),
                           log_path=tmp_path / "w.log") as launcher, Client(fleet.cfg.frontend, timeout_s=120) as client:
            row = wait_for(lambda: workers_of(client, "remote").get("sw"), timeout_s=120,
                           what="the group to register (see w.log)")
            pids = [r["pid"] for r in row["ranks"]]
            assert len(set(pids)) == 2 and launcher.proc.pid not in pids and row["pid"] == pids[0]
            ids = mt[1].encode(PROMPTS[1])
            done = client.generate(model="remote", prompt_tokens=ids, max_tokens=24)
            assert done.token_ids == greedy_reference(*mt, ids, 24)[0]
            assert launcher.stop() == 0, launcher.log()
            wait_for(lambda: "sw" not in workers_of(client, "remote"), timeout_s=20, what="the group to leave")
            for pid in pids:
                wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout_s=20, what=f"rank pid {pid} to exit")
    finally:
        fleet.stop()
