"""The soak's broker-kill mode (``--kill-broker-every-s``): kill the broker on a schedule under load,
and measure what each kill cost the streams open across it.

A stream's *stall* at a kill is the gap it saw between its last event before the kill
(its start, or a chunk) and its first after (a chunk, or its end): the time the kill
added to its flow, recovery included. Streams that did not survive are counted as lost
by the soak itself, not here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any, Callable

from actors.stats import percentile


async def kill_every(every_s: float, stop_at_s: float, broker_pid: Callable[[], int | None],
                     kills_s: list[float]) -> None:
    """SIGKILL the broker every ``every_s`` until ``stop_at_s`` (monotonic); note when, in ``kills_s``."""
    next_s = time.monotonic() + every_s
    while next_s < stop_at_s:
        await asyncio.sleep(max(0.0, next_s - time.monotonic()))  # a schedule, not a wait for an event
        pid = broker_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
                kills_s.append(time.monotonic())
            except ProcessLookupError:
                pass  # it was restarting already
        next_s += every_s


def stall_across(kill_s: float, events_s: list[float]) -> float | None:
    """The gap between the last event before ``kill_s`` and the first after; None if the stream was not open then."""
    for before, after in zip(events_s, events_s[1:]):
        if before <= kill_s < after:
            return after - before
    return None


def stalls_by_kill(kills_s: list[float], streams: list[list[float]], t0_s: float) -> list[dict[str, Any]]:
    """One row per kill: when (from the start), how many streams it caught, and their stalls (p50, p99, max)."""
    rows = []
    for kill_s in kills_s:
        stalls = sorted(s for s in (stall_across(kill_s, events) for events in streams) if s is not None)
        row: dict[str, Any] = {"at_s": round(kill_s - t0_s, 1), "streams": len(stalls)}
        if stalls:
            row.update({"stall_p50_s": round(percentile(stalls, 50), 3), "stall_p99_s": round(percentile(stalls, 99), 3),
                        "stall_max_s": round(stalls[-1], 3)})
        rows.append(row)
    return rows


def kills_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The table of kills for the report."""
    lines = ["| kill at (s) | streams open | stall p50 (s) | stall p99 (s) | stall max (s) |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['at_s']} | {r['streams']} | {r.get('stall_p50_s', '-')} | {r.get('stall_p99_s', '-')} | "
                     f"{r.get('stall_max_s', '-')} |")
    return lines
