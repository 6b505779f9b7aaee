"""Clients that vanish, flood, stall or ask for tiny deadlines, against a real fleet over tcp.

- A client that disconnects with non-streaming requests in flight frees the worker
  within a second (the frontend's socket monitor), and the broker logs one line.
- A client that floods the queue does not hold up another client's requests.
- A client that stops reading is cut off over tcp too: the broker's kernel send
  buffer per connection is small (``client_sndbuf_bytes``), so the backlog shows in
  ZeroMQ's ``client_hwm`` count.
- A 1 ms ``timeout_s`` is answered in milliseconds, not on the broker's next tick.
- A supervisor killed with SIGKILL leaves its runtime folder; the next start removes it.
"""

from __future__ import annotations

import signal
import statistics
import time
from functools import partial
from pathlib import Path

import pytest

from actors.config import BatchingConfig
from actors.control import OWNER_FILE, RUNTIME_PREFIX, runtime_root
from mlx_fleet.client import Client
from tests.integration.clients import RawClient, generate
from tests.integration.fleets import fleet_status, free_tcp_port, running_fleet, start_fleet
from tests.integration.processes import FleetProcess, children_of, is_gone, write_config
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LONG_TOKENS = 5000  # only ends early if the fleet ends it
CAPACITY = 16  # a fixed decode capacity, so a few dozen requests fill the worker and queue
FREED_WITHIN_S = 1.0  # a vanished client's requests leave the worker within this bound


@pytest.fixture(scope="module")
def fleet():
    f = start_fleet(transport="tcp", batching=BatchingConfig(decode_capacity=CAPACITY))
    yield f
    f.stop()


gen = partial(generate, model="demo", max_tokens=4)  # a short request; any field may be given again


def load(addr: str) -> tuple[int, int, int]:
    """(open requests, running on workers, queued) as the broker reports them."""
    st = fleet_status(addr)
    running = sum(w["in_flight"] for m in st["models"].values() for w in m["workers"])
    queued = sum(m["queue_depth"] for m in st["models"].values())
    return st["requests"], running, queued


def test_a_vanished_non_streaming_client_frees_the_worker_at_once(capfd) -> None:
    # A fleet of its own: its processes must inherit the stderr that capfd reads.
    with running_fleet(transport="tcp", batching=BatchingConfig(decode_capacity=CAPACITY)) as f:
        addr = f.cfg.frontend
        capacity = CAPACITY
        total = capacity + 34
        quitter = RawClient(addr)
        for i in range(total):
            quitter.send(gen(f"q{i}", stream=False, max_tokens=LONG_TOKENS))
        wait_for(lambda: load(addr) == (total, capacity, total - capacity), timeout_s=30,
                 what=f"{capacity} running and {total - capacity} queued")
        capfd.readouterr()
        quitter.close()
        t0 = time.monotonic()
        wait_for(lambda: load(addr) == (0, 0, 0), timeout_s=10, interval_s=0.02, what="the worker freed")
        freed_s = time.monotonic() - t0
        with Client(addr, timeout_s=30) as client:  # the fleet serves on
            assert client.generate("next", model="demo", max_tokens=3).token_ids
        logged = capfd.readouterr().err.splitlines()
    assert freed_s <= FREED_WITHIN_S, f"freed after {freed_s:.2f}s"
    lines = [ln for ln in logged if "queued requests" in ln]
    assert len(lines) == 1, lines
    assert f"disconnected: cancelled {capacity} running and dropped {total - capacity} queued requests" in lines[0]


def test_a_flooding_client_does_not_hold_up_another(fleet) -> None:
    """Clients take turns: the polite client's requests go between the flood's, not after all of it."""
    addr = fleet.cfg.frontend
    flood = RawClient(addr)  # never reads until the end
    n_flood = 6 * CAPACITY
    try:
        for i in range(n_flood):
            flood.send(gen(f"f{i}", stream=False, max_tokens=24))
        wait_for(lambda: load(addr)[2] > 0, timeout_s=30, what="the flood to fill the worker")
        waits_s = []
        with Client(addr, timeout_s=60) as client:
            for i in range(4):
                done = client.generate(f"polite {i}", model="demo", max_tokens=2)
                waits_s.append(done.timings["queue_s"])
            still_queued = load(addr)[2]
        # Read the flood's replies: what one of its requests took to run, and how long its last one waited.
        replies = []
        while len(replies) < n_flood:
            msg = flood.recv(60)
            assert msg is not None, f"only {len(replies)} of {n_flood} flood replies"
            replies.append(msg)
        assert all(m["type"] == "done" for m in replies)
        run_s = max(m["timings"]["total_s"] - m["timings"]["queue_s"] for m in replies)
        last_wait_s = max(m["timings"]["queue_s"] for m in replies)
    finally:
        flood.close()
    assert still_queued > 0, "the flood was over before the polite client finished: nothing was tested"
    # Each polite request waits for about one flood request to finish, not for the flood's whole queue.
    assert max(waits_s) <= 2 * run_s + 0.25, (waits_s, run_s)
    assert max(waits_s) < last_wait_s / 2, (waits_s, last_wait_s)


@pytest.mark.slow
def test_a_client_that_stops_reading_is_cut_off_over_tcp() -> None:
    """Over tcp the kernel's buffers used to hide megabytes of backlog from client_hwm; now they are small."""
    hwm, sndbuf_bytes, rcvhwm, rcvbuf_bytes = 32, 65_536, 100, 4096
    with running_fleet(transport="tcp", client_hwm=hwm, client_sndbuf_bytes=sndbuf_bytes) as f:
        addr = f.cfg.frontend
        before = fleet_status(addr)["counters"]["abandoned"]
        deaf = RawClient(addr, rcvhwm=rcvhwm, rcvbuf_bytes=rcvbuf_bytes)
        try:
            for i in range(8):
                deaf.send(gen(f"deaf{i}", max_tokens=LONG_TOKENS))
            wait_for(lambda: fleet_status(addr)["counters"]["abandoned"] >= before + 8, timeout_s=120, interval_s=0.2,
                     what="the client that stopped reading to be cut off")
            wait_for(lambda: load(addr) == (0, 0, 0), timeout_s=10, what="its requests to leave the worker")
            got = 0
            while deaf.recv(0.5) is not None:
                got += 1
        finally:
            deaf.close()
    # What piled up: the broker's queue (hwm), both kernels' buffers (Linux doubles the sizes asked
    # for) and the client's own queue. A chunk message is at least 40 bytes on the wire.
    bound = hwm + rcvhwm + (2 * sndbuf_bytes + 2 * rcvbuf_bytes) // 40
    assert 0 < got <= bound, (got, bound)


def test_a_one_millisecond_timeout_is_answered_in_milliseconds(fleet) -> None:
    addr = fleet.cfg.frontend
    raw = RawClient(addr)
    try:
        took_s = []
        for i in range(12):
            t0 = time.monotonic()
            reply = raw.call(gen(f"t{i}", timeout_s=0.001, max_tokens=LONG_TOKENS), timeout_s=10)
            took_s.append(time.monotonic() - t0)
            assert reply["type"] == "error" and reply["code"] == "timeout", reply
    finally:
        raw.close()
    wait_for(lambda: load(addr) == (0, 0, 0), timeout_s=10, what="the timed-out requests to leave the worker")
    # The broker's periodic tick is 50 ms; deadlines are watched on their own.
    assert statistics.median(took_s) <= 0.015, took_s


@pytest.mark.slow
def test_a_killed_supervisors_runtime_folder_is_removed_on_the_next_start(tmp_path: Path, ipc_dir: str) -> None:
    config = write_config(tmp_path / "fleet.toml", frontend=f"ipc://{ipc_dir}/front", backend=f"ipc://{ipc_dir}/back",
                          metrics_events=f"ipc://{ipc_dir}/events", metrics_port=free_tcp_port(), http_port=0)
    up = FleetProcess("up", "--config", str(config), log_path=tmp_path / "up.log").start()
    proc = up.proc
    try:
        up.wait_logged("fleet ready", 120, "`mlx-fleet up` ready")
        owned = [p for p in Path(runtime_root()).glob(RUNTIME_PREFIX + "*")
                 if (p / OWNER_FILE).is_file() and (p / OWNER_FILE).read_text().strip() == str(proc.pid)]
        assert len(owned) == 1, owned
        children = children_of(proc.pid)
        assert children, "no children"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        wait_for(lambda: all(is_gone(p) for p in children), timeout_s=30, what="the killed supervisor's children to exit")
        assert owned[0].is_dir()  # nobody removed it
        with running_fleet():  # the next start (any supervisor of this user)
            assert not owned[0].exists()
    finally:
        up.stop()
