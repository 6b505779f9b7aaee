"""The decode capacity sized from memory, as `status` shows it, and `mlx-fleet top` against a running fleet:
its figures are the ones `status` gives, on a terminal and off one."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from actors.config import BatchingConfig
from mlx_fleet.client import Client
from tests.integration.fleets import fleet_status, running_fleet
from tests.integration.processes import cli
from tests.integration.terminal import Terminal
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DEMO_KV_BYTES_PER_TOKEN = 4 * 2 * 64 * 2 * 4  # the demo model: 4 layers x 2 KV heads x 64 x keys+values x float32


def test_auto_capacity_is_sized_from_memory_shown_in_status_and_requests_past_it_wait() -> None:
    tiny = BatchingConfig(kv_memory_fraction=1e-4, prompt_cache_entries=0)  # a budget of a few sequences at most
    with running_fleet(batching=tiny) as fleet:
        addr = fleet.cfg.frontend
        w = fleet_status(addr)["models"]["demo"]["workers"][0]
        plan = w["info"]["capacity"]
        assert plan["setting"] == "auto" and plan["memory_source"] == "MemAvailable"
        assert (plan["kv_bytes_per_token"], plan["context_tokens"], plan["share"]) == (DEMO_KV_BYTES_PER_TOKEN, 1280, 1)
        fits = int(plan["free_bytes"] * plan["kv_memory_fraction"]) // (DEMO_KV_BYTES_PER_TOKEN * 1280)
        assert w["capacity"] == plan["capacity"] == max(1, min(64, fits)) < 64
        text = cli("status", "--connect", addr).stdout
        assert f"capacity {w['capacity']}: auto: " in text and "free (MemAvailable) x 0.0001" in text
        # More requests than the capacity: the rest wait in the broker, and every one completes.
        with Client(addr, timeout_s=120) as client:
            streams = [client.stream(f"wait {i}", model="demo", max_tokens=4) for i in range(w["capacity"] + 3)]
            done = [list(s) and s.completion for s in streams]
        assert all(d is not None and d.finish_reason in ("stop", "length") for d in done)
        assert fleet_status(addr)["models"]["demo"]["workers"][0]["max_in_flight"] == w["capacity"]


def test_a_number_set_for_the_capacity_wins() -> None:
    with running_fleet(batching=BatchingConfig(decode_capacity=3)) as fleet:
        w = fleet_status(fleet.cfg.frontend)["models"]["demo"]["workers"][0]
        assert w["capacity"] == 3 and w["info"]["capacity"]["reason"] == "set: decode_capacity=3"


def parse_top(stdout: str) -> dict[str, dict[str, str]]:
    """The last refresh of `top`'s plain output: its key=value lines, by model and replica name."""
    block = stdout.strip().split("\n\n")[-1]
    out: dict[str, dict[str, str]] = {}
    for line in block.splitlines():
        if line.startswith("top ") or line.startswith("lost "):
            fields = dict(kv.split("=", 1) for kv in line.split()[2:])
            out["broker" if line.startswith("top ") else "lost"] = fields
            continue
        fields = dict(kv.split("=", 1) for kv in line.split())
        out[fields.get("model") or fields["replica"]] = fields
    return out


def same(shown: str, value: Any, digits: int) -> bool:
    return shown == ("-" if value is None else f"{value:.{digits}f}")


@pytest.fixture(scope="module")
def busy_fleet():
    """demo x 2, after a few multi-turn conversations (cache hits, prefix keys, latencies to show)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENBLAS_NUM_THREADS", "1")
        with running_fleet(models=(("demo", "demo", 2),)) as fleet:
            with Client(fleet.cfg.frontend, timeout_s=60) as client:
                for c in range(3):
                    chat = [{"role": "system", "content": "Be brief. " * 20}, {"role": "user", "content": f"hi {c}"}]
                    for turn in range(3):
                        done = client.generate(messages=chat, model="demo", max_tokens=6)
                        chat += [{"role": "assistant", "content": done.text}, {"role": "user", "content": f"{turn}?"}]
            wait_for(lambda: fleet_status(fleet.cfg.frontend)["requests"] == 0, timeout_s=30, what="the fleet idle")
            yield fleet


def test_top_without_a_terminal_prints_the_figures_of_status(busy_fleet) -> None:
    addr = busy_fleet.cfg.frontend
    proc = cli("top", "--connect", addr, "--iterations", "2", "--interval", "0.2")
    status = json.loads(cli("status", "--json", "--connect", addr).stdout)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\ntop ") + proc.stdout.startswith("top ") == 2  # two refreshes
    shown = parse_top(proc.stdout)
    assert shown["broker"]["broker_pid"] == str(status["broker"]["pid"]) and shown["broker"]["accepting"] == "yes"
    assert shown["broker"]["routing"] == "cache_aware"
    m = status["models"]["demo"]
    top_m = shown["demo"]
    assert (top_m["state"], top_m["queue"], top_m["running"], top_m["capacity"]) == (
        m["state"], str(m["queue_depth"]), str(m["running"]), str(m["capacity"]))
    assert same(top_m["ttft_p50_s"], m["recent"]["ttft_p50_s"], 3)
    assert same(top_m["cache_hit"], m["recent"]["cache_hit_rate"], 3) and float(top_m["cache_hit"]) > 0
    assert float(top_m["tok_s"]) == pytest.approx(m["recent"]["tok_per_s"], rel=0.3)  # the window's span grows
    assert set(top_m["routed"].split(",")) == {f"{k}:{v}" for k, v in m["routed"].items() if v}
    for w in m["workers"]:
        r = shown[w["worker_id"]]
        assert (r["state"], r["in_flight"], r["capacity"], r["restarts"], r["served"], r["prefix_keys"]) == (
            w["state"], str(w["in_flight"]), str(w["capacity"]), str(w["restarts"]), str(w["served"]),
            str(w["prefixes"]["keys"]))
        assert same(r["ttft_p99_s"], w["recent"]["ttft_p99_s"], 3)
        assert same(r["cache_hit"], w["recent"]["cache_hit_rate"], 3)
    assert sum(int(shown[w["worker_id"]]["served"]) for w in m["workers"]) == 9


def test_top_on_a_terminal_draws_the_table_and_quits_on_q(busy_fleet) -> None:
    addr = busy_fleet.cfg.frontend
    term = Terminal([sys.executable, "-m", "mlx_fleet", "top", "--connect", addr, "--interval", "0.3"])
    try:
        term.expect("mlx-fleet top")
        at = term.expect("RUN/CAP")
        for w in fleet_status(addr)["models"]["demo"]["workers"]:
            term.expect(w["worker_id"], after=at)
        term.type("q")
        assert term.wait(20) == 0
    finally:
        if term.exit_code is None:
            term.kill()
