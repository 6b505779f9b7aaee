"""Continuous batching through a live fleet: correctness under concurrency, cancel, priority."""

from __future__ import annotations

import threading
import time

import pytest

from actors.config import BatchingConfig
from mlx_fleet.client import Client
from tests.integration.clients import RawClient
from tests.integration.fleets import start_fleet
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPTS = [f"Request number {i}: tell me about {topic}." for i, topic in enumerate(
    ["queues", "weather", "bread", "rivers", "lamps", "boats", "clocks", "tea"])]


@pytest.fixture(scope="module")
def fleet():
    f = start_fleet(batching=BatchingConfig(decode_capacity=8, admission_batch=8))
    yield f
    f.stop()


def worker_stats(client: Client) -> dict:
    (worker,) = client.status()["models"]["demo"]["workers"]
    return worker


def test_eight_concurrent_clients_match_single_stream(fleet):
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        singles = {p: client.generate(p, model="demo", max_tokens=24) for p in PROMPTS}
    alone = {p: c.token_ids for p, c in singles.items()}
    assert {c.timings["path"] for c in singles.values()} == {"solo"}  # one at a time: generate_step
    results: dict[str, list[int]] = {}
    paths: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(PROMPTS))

    def run(prompt: str) -> None:
        try:
            with Client(fleet.cfg.frontend, timeout_s=60) as c:
                barrier.wait(10)
                done = c.generate(prompt, model="demo", max_tokens=24)
                results[prompt] = done.token_ids
                paths.append(done.timings["path"])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == alone
    with Client(fleet.cfg.frontend, timeout_s=30) as client:
        stats = wait_for(lambda: worker_stats(client)["stats"].get("max_batch_size", 0) >= 4 and worker_stats(client)["stats"],
                         10, "a heartbeat reporting a batched step")
    assert stats["max_batch_size"] >= 4, stats
    assert stats["mean_batch_size"] > 1.0
    assert set(paths) <= {"solo", "batch", "handoff"} and "batch" in paths, paths
    with Client(fleet.cfg.frontend, timeout_s=30) as client:
        stats = wait_for(lambda: counted_by_path(worker_stats(client)["stats"], 2 * len(PROMPTS)), 10,
                         "a heartbeat counting every request by path")
    assert stats["requests_solo"] >= len(PROMPTS) and stats["batch_steps"] > 0 and stats["mlx_s"] > stats["own_s"] > 0


def counted_by_path(stats: dict, at_least: int) -> dict | None:
    """``stats`` once its per-path request counts add up to ``at_least``."""
    return stats if sum(stats.get(f"requests_{p}", 0) for p in ("solo", "batch", "handoff")) >= at_least else None


def test_cancel_frees_the_slot(fleet):
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        stream = client.stream("Cancel me", model="demo", max_tokens=2000)
        it = iter(stream)
        next(it)  # it is running
        client.cancel(stream.request_id)
        rest = list(it)
        assert stream.completion is not None and stream.completion.finish_reason == "cancelled"
        assert len(rest) < 1999
        wait_for(lambda: worker_stats(client)["in_flight"] == 0, 10, "the slot to be free")


def test_urgent_request_is_served_before_queued_background_work(fleet):
    # Fill every decode slot with long background work, queue more background
    # work behind it, then send one urgent request: it must finish before the
    # queued background requests get their first token.
    capacity = fleet.cfg.models[0].batching.decode_capacity
    raw = RawClient(fleet.cfg.frontend)  # one socket carries all of them; read replies in arrival order
    try:
        def send(rid: str, prompt: str, max_tokens: int, priority: str) -> None:
            raw.send({"type": "generate", "request_id": rid, "model": "demo", "prompt": prompt,
                      "max_tokens": max_tokens, "priority": priority})

        # Staggered lengths free one slot at a time.
        for i in range(capacity):
            send(f"filler-{i}", f"fill {i}", 30 + 15 * i, "background")
        for i in range(4):
            send(f"queued-{i}", f"queued {i}", 5, "background")
        send("urgent", "urgent", 5, "urgent")
        pending = {f"filler-{i}" for i in range(capacity)} | {f"queued-{i}" for i in range(4)} | {"urgent"}
        known = set(pending)
        finished_order: list[str] = []
        deadline = time.monotonic() + 60
        while pending:
            data = raw.recv(max(0.0, deadline - time.monotonic()))
            assert data is not None, f"no reply within 60 s; still open: {sorted(pending)}"
            rid = data.get("request_id")
            assert rid in known, data
            if data["type"] in ("done", "error"):
                assert data["type"] == "done", data
                pending.discard(rid)
                finished_order.append(rid.split("-")[0])
    finally:
        raw.close()
    assert finished_order.index("urgent") < min(i for i, n in enumerate(finished_order) if n == "queued")
