"""A sharded replica: demo-small split over two ranks on MLX's ring backend.

First the engines alone: two spawned ranks, rank 0 driving a ShardedEngine through the
solo path, a handoff, a batch with shared and seeded samplers, and a removal; the follower
applies the same ops, and both must produce the same events, token for token. Then the
fleet: a ``shards = 2`` replica answers greedy requests exactly as in-process mlx_lm does
(solo, four at once, one cancelled mid-stream), and survives kill -9 of its follower.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import time
from types import SimpleNamespace
from typing import Any

import pytest

from actors.config import BatchingConfig
from actors.shard_group import ShardRank, local_ring, ring_env
from tests.integration.fleetutil import (
    RawClient, Tracker, fleet_status, greedy_reference, make_config, wait_for, worker_row,
)
from fleet.embedded import BackgroundFleet

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "demo-small"
PROMPTS = ["Once upon a time", "The weather today is", "Tell me about queues and workers.", "Hello"]


@pytest.fixture(scope="module")
def mt() -> tuple[Any, Any]:
    """The unsharded demo-small, in-process: the reference."""
    from workers.demo_model import ensure_demo_model
    from workers.engine import load_model

    return load_model(str(ensure_demo_model(MODEL)))


@pytest.fixture(autouse=True)
def one_blas_thread(monkeypatch):
    """Several processes on two cores: spinning BLAS threads would starve each other."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


# ---- the engines alone -------------------------------------------------------------------

def lockstep_rank(rank: int, ring: Any, out: Any, folder: str) -> None:
    """One rank: rank 0 runs the script through a ShardedEngine, rank 1 applies what it is sent."""
    os.environ.update(ring_env(ShardRank(rank, ring), folder))
    import zmq

    from workers.blas import find_blas, preload_blas

    preload_blas(find_blas("auto"))
    from workers.demo_model import ensure_demo_model
    from workers.shard import ShardedEngine, apply_op, digest, form_group

    shard = ShardRank(rank, ring, op_timeout_s=120.0, start_timeout_s=120.0)
    settings = SimpleNamespace(source=MODEL, dtype="auto", shard=shard,
                               batching=BatchingConfig(prefill_step_size=64, prompt_cache_entries=8))
    member = form_group(str(ensure_demo_model(MODEL)), settings, zmq.Context())
    events: list[list[Any]] = []
    if rank == 0:
        fails: list[str] = []
        engine = ShardedEngine(member, fail=fails.append)
        run_script(engine, events)
        deadline = time.monotonic() + 30
        while engine.ledger.pending and time.monotonic() < deadline:  # the last step's report
            for r, seq, theirs in engine.channel.reports():
                engine.ledger.report(r, seq, theirs)
            time.sleep(0.01)
        out.put((0, events, engine.seq, engine.ledger.checked, fails, engine.encode_prompt(PROMPTS[0], None, None)))
        engine.close()
        return
    while True:
        op = member.follower.recv(60_000)
        if op is None or op[0] == "close":
            break
        got = apply_op(member.engine, op)
        events += [[e.key, e.token_ids, e.finish_reason, e.path] for e in got]
        if op[0] == "step":
            member.follower.report(op[1], digest(got))
    out.put((1, events, 0, 0, [], []))


def run_script(engine: Any, events: list[list[Any]]) -> None:
    """Solo, a handoff into a batch of shared, seeded and greedy samplers, a removal, a cached prompt."""
    from workers.engine import EngineRequest

    def steps(n: int) -> None:
        for _ in range(n):
            if engine.active:
                events.extend([e.key, e.token_ids, e.finish_reason, e.path] for e in engine.step())

    ids = [engine.encode_prompt(p, None, None) for p in PROMPTS]
    engine.insert([EngineRequest("a", ids[0], 40)])  # alone: the solo path
    steps(5)
    engine.insert([EngineRequest("b", ids[1], 30, temperature=0.8),  # unseeded: the shared pool
                   EngineRequest("c", ids[2], 30, temperature=0.8),
                   EngineRequest("d", ids[3], 30, temperature=0.7, top_p=0.9, seed=7)])  # seeded: its own key
    steps(6)
    events.extend([e.key, e.token_ids, e.finish_reason, e.path] for e in engine.remove(["c"]))
    engine.set_admission_batch(2)
    engine.insert([EngineRequest("e", ids[0], 12, stop=["the"])])  # the prompt cache may serve it
    steps(200)


def test_followers_apply_the_same_ops_and_produce_the_same_tokens(mt, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    ring = local_ring(2)
    procs = [ctx.Process(target=lockstep_rank, args=(r, ring, out, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = {r: rest for r, *rest in (out.get(timeout=240) for _ in procs)}
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    leader_events, steps, checked, fails, a_prompt = results[0]
    follower_events = results[1][0]
    assert fails == []
    assert leader_events == follower_events
    assert steps > 40 and checked == steps, "every step was confirmed by the follower's digest"
    ends = {e[0]: (e[2], e[3]) for e in leader_events if e[2] is not None}
    assert ends["c"][0] == "cancelled" and ends["a"][1] == "handoff" and set(ends) == set("abcde")
    # The greedy request, solo and then handed off, is what unsharded mlx_lm gives.
    a_ids = [t for e in leader_events if e[0] == "a" for t in e[1]]
    assert a_ids == greedy_reference(*mt, a_prompt, 40)[0]


# ---- the fleet -----------------------------------------------------------------------------

def sharded_fleet(**overrides: Any) -> BackgroundFleet:
    cfg, ipc_dir = make_config(models=(("s", MODEL, 1),), batching=BatchingConfig(prefill_step_size=64),
                               heartbeat_interval_s=0.25, heartbeat_liveness=8, restart_backoff_s=0.2, **overrides)
    cfg = dataclasses.replace(cfg, models=tuple(dataclasses.replace(m, shards=2) for m in cfg.models))
    return BackgroundFleet(cfg, ipc_dir).start()


@pytest.fixture(scope="module")
def fleet():
    f = sharded_fleet()
    try:
        yield f
    finally:
        f.stop()


def gen(rid: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    return {"type": "generate", "request_id": rid, "model": "s", "prompt_tokens": ids, "max_tokens": max_tokens,
            "stream": True}


def stream_all(raw: RawClient, reqs: dict[str, list[int]], max_tokens: int, *, cancel: str | None = None,
               cancel_after: int = 3) -> tuple[dict[str, list[int]], dict[str, dict[str, Any]]]:
    """Send every request at once; their streamed token ids and terminal replies."""
    ids: dict[str, list[int]] = {rid: [] for rid in reqs}
    ends: dict[str, dict[str, Any]] = {}
    for rid, prompt in reqs.items():
        raw.send(gen(rid, prompt, max_tokens))
    deadline = time.monotonic() + 120
    while len(ends) < len(reqs):
        assert time.monotonic() < deadline, f"no reply for {set(reqs) - set(ends)}"
        msg = raw.recv(1.0)
        if msg is None or msg.get("request_id") not in reqs:
            continue
        rid = msg["request_id"]
        if msg["type"] == "chunk":
            ids[rid] += msg["token_ids"]
            if rid == cancel and len(ids[rid]) >= cancel_after:
                raw.send({"type": "cancel", "request_id": rid})
                cancel = None
        else:
            assert rid not in ends, f"{rid}: a second terminal reply {msg}"
            ends[rid] = msg
    return ids, ends


def prompts_and_references(mt: tuple[Any, Any], prefix: str, max_tokens: int) -> tuple[dict[str, list[int]],
                                                                                      dict[str, list[int]]]:
    """PROMPTS as token ids under ids ``<prefix><i>``, and in-process mlx_lm's greedy tokens for each."""
    prompts = {f"{prefix}{i}": mt[1].encode(p) for i, p in enumerate(PROMPTS)}
    return prompts, {rid: greedy_reference(*mt, ids, max_tokens)[0] for rid, ids in prompts.items()}


def test_solo_and_batch_are_token_for_token_mlx_lm(fleet, mt):
    prompts, refs = prompts_and_references(mt, "q", 32)
    raw = RawClient(fleet.cfg.frontend)
    try:
        ids, ends = stream_all(raw, {"solo": prompts["q0"]}, 32)
        assert ends["solo"]["type"] == "done" and ends["solo"]["timings"]["path"] == "solo"
        assert ids["solo"] == refs["q0"]
        ids, ends = stream_all(raw, prompts, 32)
        for rid in prompts:
            assert ends[rid]["type"] == "done", ends[rid]
            assert ids[rid] == refs[rid], rid
        assert {e["timings"]["path"] for e in ends.values()} & {"batch", "handoff"}
    finally:
        raw.close()
    row = worker_row(fleet_status(fleet.cfg.frontend), "s-0")
    ranks = row["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] == row["pid"] and all(r["host"] for r in ranks)
    assert row["info"]["shards"] == 2 and row["info"]["shard_mode"] == "tensor"
    wait_for(lambda: worker_row(fleet_status(fleet.cfg.frontend), "s-0")["stats"].get("shard_checked_steps", 0) > 32,
             timeout_s=10, what="the follower's confirmed steps in a heartbeat")


def test_a_request_cancelled_mid_stream_leaves_the_others_exact(fleet, mt):
    prompts, refs = prompts_and_references(mt, "k", 40)
    raw = RawClient(fleet.cfg.frontend)
    try:
        ids, ends = stream_all(raw, prompts, 40, cancel="k1", cancel_after=4)
    finally:
        raw.close()
    assert ends["k1"]["type"] == "done" and ends["k1"]["finish_reason"] == "cancelled"
    assert ids["k1"] == refs["k1"][: len(ids["k1"])] and len(ids["k1"]) < 40
    for rid in ("k0", "k2", "k3"):
        assert ends[rid]["type"] == "done" and ids[rid] == refs[rid], rid


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
    from broker.client import Client
    from tests.integration.clusterutil import WorkerProcess, workers_of, write_worker_config
    from tests.integration.fleetutil import free_tcp_port, start_fleet

    fleet = start_fleet(transport="tcp", models=(("remote", MODEL, 0),), heartbeat_interval_s=0.3)
    conf = write_worker_config(tmp_path / "w.toml", heartbeat_interval_s=0.3)
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
