"""A sharded replica: demo-small split over two ranks on MLX's ring backend.

First the engines alone: two spawned ranks, rank 0 driving a ShardedEngine through the
solo path, a handoff, a batch with shared and seeded samplers, and a removal; the follower
applies the same ops, and both must produce the same events, token for token. Then the
fleet: a ``shards = 2`` replica answers greedy requests exactly as in-process mlx_lm does
(solo, four at once, one cancelled mid-stream). Its failures are in test_shard_lifecycle.py.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from types import SimpleNamespace
from typing import Any

import pytest

from actors.config import BatchingConfig
from actors.shard_group import ShardRank, local_ring, ring_env
from tests.integration.clients import RawClient
from tests.integration.fleets import fleet_status, worker_row
from tests.integration.reference import greedy_reference
from tests.integration.shards import (  # noqa: F401 (mt and one_blas_thread are fixtures)
    MODEL, PROMPTS, mt, one_blas_thread, prompts_and_references, sharded_fleet, stream_all,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


# ---- the engines alone -------------------------------------------------------------------

def lockstep_rank(rank: int, ring: Any, out: Any, folder: str) -> None:
    """One rank: rank 0 runs the script through a ShardedEngine, rank 1 applies what it is sent."""
    os.environ.update(ring_env(ShardRank(rank, ring), folder))
    import zmq

    from workers.blas import find_blas, preload_blas

    preload_blas(find_blas("auto"))
    from workers.models.demo_model import ensure_demo_model
    from workers.shard.engine import ShardedEngine, apply_op, digest, form_group

    shard = ShardRank(rank, ring, op_timeout_s=120.0, start_timeout_s=120.0)
    settings = SimpleNamespace(source=MODEL, dtype="auto", shard=shard, memory_share=2, model="demo", chat_template="", tool_format="",
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
        out.put((0, events, engine.seq, engine.ledger.checked, fails, engine.encode_prompt(PROMPTS[0], None, None),
                 member.engine.decode_capacity))
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
    out.put((1, events, 0, 0, [], [], member.engine.decode_capacity))


def run_script(engine: Any, events: list[list[Any]]) -> None:
    """Solo, a handoff into a batch of shared, seeded and greedy samplers, a removal, a cached prompt."""
    from workers.engine.adapter import EngineRequest

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
    rank0_events, steps, checked, fails, a_prompt, capacity = results[0]
    assert capacity == results[1][-1]  # the ranks agreed on one decode capacity (the smallest either could hold)
    follower_events = results[1][0]
    assert fails == []
    assert rank0_events == follower_events
    assert steps > 40 and checked == steps, "every step was confirmed by the follower's digest"
    ends = {e[0]: (e[2], e[3]) for e in rank0_events if e[2] is not None}
    assert ends["c"][0] == "cancelled" and ends["a"][1] == "handoff" and set(ends) == set("abcde")
    # The greedy request, solo and then handed off, is what unsharded mlx_lm gives.
    a_ids = [t for e in rank0_events if e[0] == "a" for t in e[1]]
    assert a_ids == greedy_reference(*mt, a_prompt, 40)[0]


# ---- the fleet -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet():
    f = sharded_fleet()
    try:
        yield f
    finally:
        f.stop()


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
