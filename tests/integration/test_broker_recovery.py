"""A broker crash loses no request: kill -9 it under load, twice, with a worker dying meanwhile, and
restart it on purpose; every request ends once, and every greedy text equals in-process mlx-lm.

One fleet (demo x 2 replicas, 16 slots each) serves the whole module. Each test puts 64
requests in flight (32 running, 32 waiting in the broker) and then breaks the broker; the
supervisor restarts it (restart_backoff_s 0.2 s), the workers hand it their tables, and the
clients resend what had shown no output. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from actors.config import BatchingConfig
from mlx_fleet.client import AsyncClient, Client, FleetError
from tests.integration.fleets import fleet_status, running_fleet
from tests.integration.recovering import RecoveringClient
from tests.integration.reference import greedy_reference
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

MAX_TOKENS = 160
PROMPTS = [f"Request {i}: tell me about {topic}." for i, topic in enumerate(
    ["queues", "weather", "bread", "rivers", "lamps", "boats", "clocks", "tea"])]
# One fleet for the module, its broker killed every few seconds: a short stable run keeps its restarts quick.
# 24 decode slots a replica (not the memory-sized default): of the 64 requests in flight, some
# still wait in the broker's queue when it dies, so their resends are run again, not adopted.
FLEET: dict[str, Any] = {"models": (("demo", "demo", 2),), "batching": BatchingConfig(decode_capacity=24),
                         "heartbeat_interval_s": 0.2, "heartbeat_liveness": 5,
                         "restart_backoff_s": 0.2, "restart_stable_s": 2.0, "restart_max": 50}


@pytest.fixture(autouse=True)
def one_blas_thread_per_worker(monkeypatch):
    """Two replicas on a 2-core box: spinning BLAS threads would starve each other's heartbeats."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def references(demo_model: tuple[Any, Any]) -> dict[str, tuple[list[int], str]]:
    """Greedy token ids and text of each prompt, from in-process mlx-lm."""
    return {p: greedy_reference(*demo_model, p, MAX_TOKENS) for p in PROMPTS}


@pytest.fixture(scope="module")
def fleet():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENBLAS_NUM_THREADS", "1")  # the workers it spawns read it
        with running_fleet(**FLEET) as f:
            yield f


@dataclass
class Outcome:
    """What one request got, as the client library gave it."""

    prompt: str
    stream: bool
    chunks: list[tuple[str, list[int]]] = field(default_factory=list)
    text: str | None = None
    token_ids: list[int] | None = None
    error: FleetError | None = None
    ends: int = 0  # how many times the request ended (a completion or an error): must be one


class Load:
    """64 requests through a Client per thread (4 x 8) and one AsyncClient (32); half of them streamed."""

    def __init__(self, addr: str, *, recover_timeout_s: float = 15.0) -> None:
        self.addr = addr
        self.recover_timeout_s = recover_timeout_s
        self.outcomes: dict[str, Outcome] = {}
        self.first_chunks = threading.Semaphore(0)
        self.threads = [threading.Thread(target=self._sync, args=(t,)) for t in range(4)]
        self.threads.append(threading.Thread(target=lambda: asyncio.run(self._async())))

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout_s: float) -> None:
        for t in self.threads:
            t.join(timeout_s)
            assert not t.is_alive(), "a client hung"

    def _outcome(self, name: str, i: int) -> Outcome:
        out = self.outcomes[name] = Outcome(PROMPTS[i % len(PROMPTS)], stream=i % 2 == 0)
        return out

    def _sync(self, t: int) -> None:
        with Client(self.addr, timeout_s=120, recover_timeout_s=self.recover_timeout_s) as client:
            streams = []
            for i in range(8):
                out = self._outcome(f"sync{t}-{i}", i + t)
                streams.append((out, client.stream(out.prompt, model="demo", max_tokens=MAX_TOKENS, stream=out.stream)))
            for out, stream in streams:
                try:
                    for n, chunk in enumerate(stream):
                        out.chunks.append((chunk.text, chunk.token_ids))
                        if n == 0:
                            self.first_chunks.release()
                    assert stream.completion is not None
                    out.text, out.token_ids = stream.completion.text, stream.completion.token_ids
                except FleetError as exc:
                    out.error = exc
                out.ends += 1

    async def _async(self) -> None:
        async with AsyncClient(self.addr, timeout_s=120, recover_timeout_s=self.recover_timeout_s) as client:
            async def one(i: int) -> None:
                out = self._outcome(f"async-{i}", i)
                try:
                    stream = client.stream(out.prompt, model="demo", max_tokens=MAX_TOKENS, stream=out.stream)
                    async for chunk in stream:
                        if not out.chunks:
                            self.first_chunks.release()
                        out.chunks.append((chunk.text, chunk.token_ids))
                    assert stream.completion is not None
                    out.text, out.token_ids = stream.completion.text, stream.completion.token_ids
                except FleetError as exc:
                    out.error = exc
                out.ends += 1

            await asyncio.gather(*(one(i) for i in range(32)))

    def under_way(self, addr: str) -> "Load":
        """Until the fleet holds (nearly) all 64 requests, 16 of them waiting, and 4 streams show output."""
        wait_for(lambda: fleet_status(addr)["requests"] >= 60, timeout_s=30, what="64 requests in the fleet")
        for _ in range(4):
            assert self.first_chunks.acquire(timeout=60), "streams never started"
        return self


def assert_greedy(outcomes: dict[str, Outcome], refs: dict[str, tuple[list[int], str]],
                  lost: Callable[[str], bool] = lambda name: False) -> None:
    """Every request ended once; each not lost completed with its greedy text, streams with no gap and no repeat."""
    for name, out in outcomes.items():
        assert out.ends == 1, (name, out.ends)
        if lost(name):
            continue
        assert out.error is None, (name, out.error)
        want_ids, want_text = refs[out.prompt]
        assert (out.text, out.token_ids) == (want_text, want_ids), name
        if out.stream:
            assert "".join(t for t, _ in out.chunks) == want_text, name
            assert [i for _, ids in out.chunks for i in ids] == want_ids, name
        else:
            assert out.chunks == [], name


def kill_broker(fleet: Any) -> tuple[int, float]:
    pid = fleet.child("broker").process.pid
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def back_and_serving(addr: str, old_pid: int) -> Callable[[], dict[str, Any] | None]:
    """A new broker answers, with both replicas registered."""
    def check() -> dict[str, Any] | None:
        try:
            st = fleet_status(addr, timeout_s=0.5)
        except FleetError:
            return None
        workers = st["models"]["demo"]["workers"]
        ready = len(workers) == 2 and all(w["state"] == "ready" for w in workers)
        return st if st["broker"]["pid"] != old_pid and ready else None
    return check


def settled(addr: str) -> None:
    wait_for(lambda: fleet_status(addr)["requests"] == 0, timeout_s=30, what="the fleet to hold nothing")


def test_sigkill_under_load_every_request_completes_with_its_greedy_text(fleet, references):
    addr = fleet.cfg.frontend
    load = Load(addr).start().under_way(addr)
    old_pid, t_kill = kill_broker(fleet)
    st = wait_for(back_and_serving(addr, old_pid), timeout_s=20, interval_s=0.02, what="a new broker serving")
    back_s = time.monotonic() - t_kill
    load.join(120)
    assert back_s <= 2.0, f"the broker was back and serving only {back_s:.2f}s after the kill"
    assert st["recovery"]["adopted"] > 0
    assert_greedy(load.outcomes, references)
    settled(addr)
    rec = fleet_status(addr)["recovery"]
    assert rec["resends_held"] + rec["resends_joined"] > 0 and rec["resends_run"] > 0, rec


def test_sigkill_under_load_with_a_raw_client_following_the_recipe(fleet, references):
    addr = fleet.cfg.frontend
    raw = RecoveringClient(addr)
    try:
        for i in range(64):
            raw.generate(f"raw{i}", model="demo", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS,
                         stream=i % 2 == 0)
        wait_for(lambda: (raw.pump(0.05), sum(r.started for r in raw.requests.values()) >= 8)[1], timeout_s=60,
                 what="8 streams started")
        old_pid, _ = kill_broker(fleet)
        raw.run_until_done(120)
        assert raw.drops >= 1
        for rid, req in raw.requests.items():
            assert req.end is not None and req.end["type"] == "done", (rid, req.end)
            want_ids, want_text = references[req.payload["prompt"]]
            if req.payload["stream"]:
                assert ("".join(req.text), req.token_ids) == (want_text, want_ids), rid
            else:
                assert (req.end["text"], req.end["token_ids"]) == (want_text, want_ids), rid
        assert any(r.resent for r in raw.requests.values())
        assert any(r.repeats_dropped for r in raw.requests.values())  # output sent again, and dropped here
    finally:
        raw.close()
    wait_for(back_and_serving(addr, old_pid), timeout_s=20, what="the new broker")
    settled(addr)


def test_two_kills_in_quick_succession(fleet, references):
    addr = fleet.cfg.frontend
    load = Load(addr).start().under_way(addr)
    first_pid, _ = kill_broker(fleet)
    wait_for(back_and_serving(addr, first_pid), timeout_s=20, interval_s=0.02, what="the first new broker")
    second_pid, _ = kill_broker(fleet)  # while it is still taking over
    wait_for(back_and_serving(addr, second_pid), timeout_s=20, interval_s=0.02, what="the second new broker")
    load.join(120)
    assert_greedy(load.outcomes, references)
    settled(addr)


def test_a_worker_that_dies_while_the_broker_is_down(fleet, references):
    """Its started streams end unavailable, saying why; everything else completes with its greedy text."""
    addr = fleet.cfg.frontend
    load = Load(addr, recover_timeout_s=6.0).start().under_way(addr)
    worker = fleet.child("worker:demo-1")
    old_worker = worker.process.pid
    before = fleet_status(addr)
    old_pid, _ = kill_broker(fleet)
    os.kill(old_worker, signal.SIGKILL)
    load.join(120)
    wait_for(back_and_serving(addr, old_pid), timeout_s=30, what="the new broker with the restarted worker")
    lost = {name for name, out in load.outcomes.items() if out.error is not None}
    for name in lost:
        out = load.outcomes[name]
        assert out.stream and out.chunks, f"{name} had shown no output, so it should have run again: {out.error}"
        assert out.error.code == "unavailable" and "recover_timeout_s=6s" in out.error.message, out.error
        assert "no worker resumed it" in out.error.message
    assert lost, "the dead worker was running streams: they cannot all have survived"
    assert before["models"]["demo"]["workers"][1]["in_flight"] > 0
    assert_greedy(load.outcomes, references, lost=lambda name: name in lost)
    settled(addr)


def test_a_planned_restart_hands_over_and_fails_nothing(fleet, references):
    addr = fleet.cfg.frontend
    load = Load(addr).start().under_way(addr)
    broker = fleet.child("broker")
    old_pid, restarts, crashes = broker.process.pid, broker.restarts, len(broker.restart_times_s)
    fleet.sup.request_broker_restart()  # what SIGHUP to `mlx-fleet up` does
    wait_for(back_and_serving(addr, old_pid), timeout_s=20, interval_s=0.02, what="the restarted broker")
    load.join(120)
    assert_greedy(load.outcomes, references)
    assert broker.restarts == restarts + 1 and len(broker.restart_times_s) == crashes  # not counted as a crash
    assert broker.exited_pids[-1] == old_pid
    settled(addr)
