"""Hostile input and hostile clients: each gets a clear error, nobody else is harmed.

Absurd values, invalid UTF-8, oversize frames, 10,000+ fuzzed messages, a client
that vanishes mid-stream, one that never reads, and 10x overload.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import pytest
import zmq

from actors.config import BatchingConfig
from mlx_fleet.client import Client
from tests.integration.clients import TAG, RawClient, Tracker, generate, pack
from tests.integration.fleets import fleet_status, running_fleet, start_fleet
from tests.integration.fuzzgen import malformed_inputs
from tests.integration.processes import rss_kib
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LONG_TOKENS = 5000


@pytest.fixture(scope="module")
def fleet():
    f = start_fleet()
    yield f
    f.stop()


gen = partial(generate, model="demo", max_tokens=4)  # a short request; any field may be given again


def idle(addr: str) -> bool:
    st = fleet_status(addr)
    return st["requests"] == 0 and all(w["in_flight"] == 0 for m in st["models"].values() for w in m["workers"])


@pytest.mark.parametrize("fields, mentions", [
    ({"max_tokens": 10 ** 9}, "max_tokens"),
    ({"max_tokens": 2 ** 64 - 1}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": -1.0}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"top_k": 2 ** 63}, "top_k"),
    ({"seed": -7}, "seed"),
    ({"timeout_s": -1.0}, "timeout_s"),
    ({"timeout_s": float("nan")}, "timeout_s"),
    ({"prompt_tokens": [-1], "prompt": None}, "prompt_tokens"),
    ({"stop": [""] * 3}, "stop"),
])
def test_absurd_and_negative_values_get_bad_request(fleet, fields: dict[str, Any], mentions: str):
    raw = RawClient(fleet.cfg.frontend)
    try:
        reply = raw.call(gen("absurd", **fields))  # a field given as None is left out
        assert reply["type"] == "error" and reply["code"] == "bad_request", reply
        assert mentions in reply["message"]
    finally:
        raw.close()


def test_invalid_utf8_gets_bad_request(fleet):
    raw = RawClient(fleet.cfg.frontend)
    try:
        payload = pack(gen("utf8", prompt="@@")).replace(b"\xa2@@", b"\xa2\xff\xfe")
        raw.send_frames([TAG, payload])
        reply = raw.recv(10.0)
        assert reply is not None and reply["code"] == "bad_request" and "msgpack" in reply["message"]
    finally:
        raw.close()


def test_top_k_beyond_the_vocabulary_harms_no_one(fleet):
    """top_k >= vocab used to fail the batch and break sampling in the worker for good."""
    raw = RawClient(fleet.cfg.frontend)
    tracker = Tracker(raw, ["neighbour", "bigk", "after"])
    try:
        raw.send(gen("neighbour", temperature=0.8, max_tokens=24))
        raw.send(gen("bigk", temperature=0.8, top_k=5000, max_tokens=8))
        wait_for(lambda: (tracker.pump(), not tracker.terminals["bigk"] == [])[1], timeout_s=30, what="bigk")
        raw.send(gen("after", temperature=0.8, max_tokens=8))  # unseeded sampling still works
        wait_for(lambda: (tracker.pump(), not tracker.open())[1], timeout_s=30, what="all replies")
        for rid in ("neighbour", "bigk", "after"):
            (msg,) = tracker.terminals[rid]
            assert msg["type"] == "done", (rid, msg)
    finally:
        raw.close()


def test_oversize_frame_drops_only_that_connection(fleet):
    """MAXMSGSIZE makes libzmq drop the sender's connection; the broker and other clients carry on."""
    addr = fleet.cfg.frontend
    broker_pid = fleet.child("broker").process.pid
    bystander = RawClient(addr)
    attacker = RawClient(addr)
    tracker = Tracker(bystander, ["bystander"])
    try:
        bystander.send(gen("bystander", max_tokens=64))
        wait_for(lambda: (tracker.pump(), tracker.chunks["bystander"] > 0)[1], timeout_s=30, what="bystander streaming")
        attacker.send_frames([TAG, b"\x00" * (6 * 1024 * 1024)])
        assert attacker.wait_event(zmq.EVENT_DISCONNECTED, 10.0), \
            "the broker kept a connection that sent an oversize frame"
        wait_for(lambda: (tracker.pump(), not tracker.open())[1], timeout_s=60, what="the bystander's reply")
        assert tracker.terminals["bystander"][0]["type"] == "done"
        # The attacker reconnects by itself (a new connection) and is served normally.
        assert attacker.call({"type": "status", "request_id": "again"})["type"] == "status_reply"
        assert fleet_status(addr)["broker"]["pid"] == broker_pid
    finally:
        bystander.close()
        attacker.close()


def test_client_disconnecting_mid_stream_frees_its_slot(fleet):
    addr = fleet.cfg.frontend
    quitter = RawClient(addr)
    tracker = Tracker(quitter, ["quit"])
    quitter.send(gen("quit", max_tokens=LONG_TOKENS))
    wait_for(lambda: (tracker.pump(), tracker.chunks["quit"] > 0)[1], timeout_s=30, what="the stream to start")
    quitter.close()
    wait_for(lambda: idle(addr), timeout_s=10, what="the worker slot freed")
    assert fleet_status(addr)["counters"]["abandoned"] >= 1  # ended because its client went away
    with Client(addr, timeout_s=30) as client:
        assert client.generate("next", model="demo", max_tokens=3).token_ids


@pytest.mark.slow
def test_client_that_never_reads_is_cancelled_and_others_are_served():
    """Past client_hwm queued messages (ROUTER_MANDATORY + NOBLOCK) its requests are cancelled."""
    with running_fleet(client_hwm=32) as fleet:
        addr = fleet.cfg.frontend
        before = fleet_status(addr)["counters"]
        deaf = RawClient(addr, rcvhwm=1, rcvbuf_bytes=4096)
        try:
            for i in range(8):
                deaf.send(gen(f"deaf{i}", max_tokens=LONG_TOKENS))
            with Client(addr, timeout_s=60) as client:
                def cut_off() -> bool:
                    assert client.generate("meanwhile", model="demo", max_tokens=4).finish_reason == "length"
                    st = fleet_status(addr)
                    return st["counters"]["dropped"] > before["dropped"] and idle(addr)
                wait_for(cut_off, timeout_s=90, interval_s=0.2, what="the deaf client's requests cancelled")
            # All 8 were accepted and ran (they stream thousands of tokens); the broker cut them off.
            assert fleet_status(addr)["counters"]["accepted"] >= before["accepted"] + 8
        finally:
            deaf.close()


@pytest.mark.slow
def test_fuzz_ten_thousand_malformed_inputs(fleet):
    """>= 10,000 malformed client messages: one bad_request each, correct answers after, RSS flat."""
    addr = fleet.cfg.frontend
    broker_pid = fleet.child("broker").process.pid
    with Client(addr, timeout_s=60) as client:
        reference = client.generate("The fuzz reference", model="demo", max_tokens=16).token_ids
    raw = RawClient(addr)

    def blast(seed: int, count: int, *, large: bool, batch: int = 250) -> int:
        sent = answered = 0
        inputs = malformed_inputs(seed, count, large=large)
        while sent < count:
            for frames in (next(inputs) for _ in range(min(batch, count - sent))):
                raw.send_frames(frames)
                sent += 1
            while answered < sent:
                reply = raw.recv(10.0)
                assert reply is not None, f"no reply after {answered} of {sent} malformed inputs"
                assert reply["type"] == "error" and reply["code"] == "bad_request", reply
                answered += 1
        return answered

    try:
        blast(seed=7, count=3_000, large=True)  # with megabyte frames: read, rejected, freed
        blast(seed=8, count=10_000, large=False)  # warm-up: allocator pools reach their working size
        rss_before = rss_kib(broker_pid)
        t0 = time.monotonic()
        assert blast(seed=20240601, count=10_000, large=False) == 10_000
        elapsed_s = time.monotonic() - t0
        rss_after = rss_kib(broker_pid)
    finally:
        raw.close()
    # The worker endpoint too: garbage there is counted and dropped, never answered, never fatal.
    dropped_before = fleet_status(addr)["broker"]["malformed_dropped"]
    fake_worker = RawClient(fleet.cfg.backend)
    try:
        for frames in malformed_inputs(99, 2_000):
            fake_worker.send_frames(frames)
        wait_for(lambda: fleet_status(addr)["broker"]["malformed_dropped"] - dropped_before >= 2_000,
                 timeout_s=30, what="2,000 malformed worker messages counted")
        assert fake_worker.recv(0.0) is None
    finally:
        fake_worker.close()
    growth = (rss_after - rss_before) / rss_before
    print(f"fuzz: 10000 inputs in {elapsed_s:.1f}s; broker RSS {rss_before} -> {rss_after} KiB ({growth:+.1%})")
    assert growth < 0.05, f"broker RSS grew {growth:.1%} ({rss_before} -> {rss_after} KiB)"
    st = fleet_status(addr)
    assert st["broker"]["pid"] == broker_pid and st["requests"] == 0
    with Client(addr, timeout_s=60) as client:
        assert client.generate("The fuzz reference", model="demo", max_tokens=16).token_ids == reference


@pytest.mark.slow
def test_overload_ten_times_capacity():
    """80 requests at a fleet that holds 8 (4 slots + queue of 4): the excess is refused fast."""
    with running_fleet(batching=BatchingConfig(decode_capacity=4), queue_limit=4) as fleet:
        raw = RawClient(fleet.cfg.frontend)
        rids = [f"o{i}" for i in range(80)]
        tracker = Tracker(raw, rids)
        sent_at: dict[str, float] = {}
        ended_at: dict[str, float] = {}
        try:
            for rid in rids:
                sent_at[rid] = time.monotonic()
                raw.send(gen(rid, max_tokens=32, stream=False))
            while tracker.open():
                assert time.monotonic() - sent_at[rids[0]] < 120, f"open: {tracker.open()}"
                tracker.pump(0.05)
                for rid in rids:
                    if tracker.terminals[rid] and rid not in ended_at:
                        ended_at[rid] = time.monotonic()
            tracker.settle()
        finally:
            raw.close()
        refused = [r for r in rids if tracker.terminals[r][0].get("code") == "overloaded"]
        admitted = [r for r in rids if tracker.terminals[r][0]["type"] == "done"]
        assert all(len(tracker.terminals[r]) == 1 for r in rids)
        assert len(refused) + len(admitted) == 80
        assert len(admitted) >= 8 and len(refused) >= 60, (len(admitted), len(refused))
        refuse_s = sorted(ended_at[r] - sent_at[r] for r in refused)
        latency_s = sorted(ended_at[r] - sent_at[r] for r in admitted)
        p99_s = latency_s[min(len(latency_s) - 1, int(0.99 * len(latency_s)))]
        print(f"overload: {len(admitted)} admitted (p99 {p99_s:.2f}s), {len(refused)} refused "
              f"(slowest refusal {refuse_s[-1] * 1000:.0f} ms)")
        assert refuse_s[-1] < 2.0, "overloaded replies must be immediate"
        assert p99_s < 60.0, "admitted requests must complete in bounded time"
