"""`mlx-fleet top`'s views of one status map: the plain lines scripts read, and the table (mlx_fleet/top.py)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from mlx_fleet.top import plain_lines, render, run_top

pytestmark = pytest.mark.timeout(30)

STATUS: dict[str, Any] = {
    "broker": {"pid": 41, "restarts": 1}, "accepting": False, "requests": 2, "routing": {"policy": "cache_aware"},
    "recovery": {"adopted": 3, "parked": 0},
    "models": {"chat": {
        "state": "ready", "queue_depth": 5, "running": 40, "capacity": 96, "routed": {"prefix": 7, "least_loaded": 2},
        "recent": {"tok_per_s": 113.25, "ttft_p50_s": 0.4, "ttft_p99_s": 2.5, "cache_hit_rate": 0.8125},
        "workers": [
            {"worker_id": "chat-0", "state": "ready", "in_flight": 40, "capacity": 64, "restarts": 0, "served": 9,
             "recent": {"tok_per_s": 113.25, "ttft_p50_s": 0.4, "ttft_p99_s": 2.5, "cache_hit_rate": 0.8125},
             "prefixes": {"keys": 321}},
            {"worker_id": "chat-1", "state": "restarting", "in_flight": 0, "capacity": 0, "restarts": 2, "served": 0,
             "recent": {"tok_per_s": 0.0, "ttft_p50_s": None, "ttft_p99_s": None, "cache_hit_rate": None},
             "prefixes": {"keys": 0}},
        ]}},
    "recent_worker_losses": [{"worker_id": "chat-1", "pid": 77, "ago_s": 3.2, "reason": "its process 77 exited (code -9)"}],
}


def test_plain_lines_say_every_figure_as_key_value() -> None:
    lines = plain_lines(STATUS, "T")
    assert lines[0] == ("top T broker_pid=41 broker_restarts=1 accepting=no requests=2 adopted=3 parked=0 "
                        "routing=cache_aware")
    assert lines[1] == ("model=chat state=ready queue=5 running=40 capacity=96 tok_s=113.2 ttft_p50_s=0.400 "
                        "ttft_p99_s=2.500 cache_hit=0.812 routed=least_loaded:2,prefix:7")
    assert lines[2] == ("  replica=chat-0 state=ready in_flight=40 capacity=64 tok_s=113.2 ttft_p50_s=0.400 "
                        "ttft_p99_s=2.500 cache_hit=0.812 restarts=0 served=9 prefix_keys=321")
    assert "ttft_p50_s=- ttft_p99_s=- cache_hit=- restarts=2" in lines[3]
    assert lines[4] == "lost chat-1 (pid 77) 3s ago: its process 77 exited (code -9)"


def test_the_table_fits_eighty_columns() -> None:
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(render(STATUS, "tcp://127.0.0.1:5555"))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "DRAINING" in text and "40/64" in text and "400ms/2.50s" in text and "81%" in text
    assert "  chat-1" in text and "restarting" in text and "lost chat-1" in text


def test_a_plain_run_stops_after_its_iterations_and_fails_without_a_fleet() -> None:
    out = io.StringIO()
    assert run_top(lambda: STATUS, connect="x", interval_s=0.01, iterations=2, out=out) == 0
    assert out.getvalue().count("top ") == 2

    def unreachable() -> dict[str, Any]:
        raise TimeoutError("no answer")

    assert run_top(unreachable, connect="x", iterations=1, out=io.StringIO()) == 1
