"""Cache-aware routing in a running fleet (demo x 2): a conversation's turns follow the replica whose prompt
cache holds them, affinity keys still win, and the broker's prefix index comes back after a worker restart
and after a broker restart (README, Routing)."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from mlx_fleet.client import Client, FleetError
from tests.integration.fleets import fleet_status, running_fleet
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FLEET: dict[str, Any] = {"models": (("demo", "demo", 2),), "heartbeat_interval_s": 0.2, "restart_backoff_s": 0.2}


@pytest.fixture(scope="module")
def fleet():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENBLAS_NUM_THREADS", "1")  # two replicas on two cores
        with running_fleet(**FLEET) as f:
            yield f


def conversation(tag: str) -> list[dict[str, str]]:
    """A conversation of its own: a long system prompt no other test shares."""
    return [{"role": "system", "content": f"[{tag}] " + "Answer briefly and kindly. " * 12},
            {"role": "user", "content": f"{tag}: hello"}]


def served(addr: str) -> dict[str, int]:
    rows = fleet_status(addr)["models"]["demo"]["workers"]
    return {w["worker_id"]: w["served"] for w in rows if w["state"] == "ready"}


def ask(client: Client, messages: list[dict[str, str]], **options: Any) -> tuple[str, dict[str, Any]]:
    """One turn; the conversation gets the answer and a next question. Returns (answer, usage)."""
    done = client.generate(messages=messages, model="demo", max_tokens=8, **options)
    messages += [{"role": "assistant", "content": done.text}, {"role": "user", "content": f"and then {len(messages)}?"}]
    return done.text, done.usage


def who_served(addr: str, before: dict[str, int]) -> str:
    after = served(addr)
    (wid,) = [w for w, n in after.items() if n > before.get(w, 0)]
    return wid


def turn(client: Client, addr: str, messages: list[dict[str, str]], **options: Any) -> tuple[str, dict[str, Any]]:
    """One turn of ``messages`` (see :func:`ask`); returns (the replica that served it, usage)."""
    before = served(addr)
    _, usage = ask(client, messages, **options)
    return who_served(addr, before), usage


def row(addr: str, wid: str) -> dict[str, Any]:
    return next(w for w in fleet_status(addr)["models"]["demo"]["workers"] if w["worker_id"] == wid)


def test_each_turn_goes_to_the_replica_holding_the_conversation(fleet) -> None:
    addr = fleet.cfg.frontend
    with Client(addr, timeout_s=60) as client:
        chat = conversation("follow")
        home, _ = turn(client, addr, chat)
        for _ in range(4):
            where, usage = turn(client, addr, chat)
            assert where == home
            assert usage["cached_tokens"] > 0  # the history was prefilled once, on this replica
    st = fleet_status(addr)
    assert st["models"]["demo"]["routed"]["prefix"] >= 4
    assert row(addr, home)["prefixes"]["keys"] > 0


def test_an_affinity_key_still_wins_over_the_prefix(fleet) -> None:
    addr = fleet.cfg.frontend
    with Client(addr, timeout_s=60) as client:
        chat = conversation("affinity")
        home, _ = turn(client, addr, chat)
        # A prompt nobody holds goes to the least loaded replica, on a tie the least recently used: the other
        # one. The key binds to it there.
        before = served(addr)
        client.generate(prompt="unrelated " * 30, model="demo", max_tokens=2, affinity="pinned")
        other = who_served(addr, before)
        assert other != home
        where, _ = turn(client, addr, chat, affinity="pinned")
        assert where == other  # the key wins; the prefix is on `home`
    assert fleet_status(addr)["models"]["demo"]["routed"]["affinity"] >= 1


def test_the_index_recovers_after_a_worker_restart(fleet) -> None:
    addr = fleet.cfg.frontend
    with Client(addr, timeout_s=60) as client:
        chat = conversation("restart-worker")
        home, _ = turn(client, addr, chat)
        old = row(addr, home)
        assert old["prefixes"]["keys"] > 0
        os.kill(old["pid"], signal.SIGKILL)
        fresh = wait_for(lambda: (r := row(addr, home))["state"] == "ready" and r["pid"] != old["pid"] and r,
                         timeout_s=120, what="the killed replica back and registered", ignoring=(StopIteration,))
        # Its new process has an empty cache, and its first (full) report said so.
        wait_for(lambda: row(addr, home)["prefixes"]["reports"] >= 1, timeout_s=10, what="its first report")
        assert row(addr, home)["prefixes"]["keys"] == 0 and fresh["served"] == 0
        second, _ = turn(client, addr, chat)  # held nowhere now: the least loaded replica prefills it
        where, usage = turn(client, addr, chat)
        assert where == second and usage["cached_tokens"] > 0


def test_the_index_recovers_after_a_broker_restart(fleet) -> None:
    addr = fleet.cfg.frontend
    with Client(addr, timeout_s=60) as client:
        chat = conversation("restart-broker")
        home, _ = turn(client, addr, chat)
        keys = row(addr, home)["prefixes"]["keys"]
        old_pid = fleet_status(addr)["broker"]["pid"]
        os.kill(old_pid, signal.SIGKILL)

        def back() -> dict[str, Any] | None:
            st = fleet_status(addr, timeout_s=0.5)
            rows = st["models"]["demo"]["workers"]
            full = all(w["state"] == "ready" and w["prefixes"]["reports"] >= 1 for w in rows) and len(rows) == 2
            return st if st["broker"]["pid"] != old_pid and full else None

        wait_for(back, timeout_s=60, what="a new broker with both replicas' reports", ignoring=(FleetError,))
        assert row(addr, home)["prefixes"]["keys"] == keys  # rebuilt whole from the full reports after `ready`
        counts = served(addr)  # the new broker counts from zero
        _, usage = ask(client, chat)
        assert who_served(addr, counts) == home and usage["cached_tokens"] > 0
