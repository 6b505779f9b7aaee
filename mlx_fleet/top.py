"""`mlx-fleet top`: a live view of a running fleet, from its `status`, about once a second.

Each refresh is one `status` call; everything shown comes from it (docs/protocol.md, `status`):

- the broker: its pid and restarts, whether it accepts requests (or drains), the requests open,
  and its recovery figures (requests adopted from workers after a broker restart, replies parked
  for clients not back yet);
- per model: state, requests queued in the broker and running, the capacity of its replicas, and
  the last minute's generated tok/s, TTFT p50/p99 (from the broker's acceptance) and prompt-cache
  hit rate (prompt tokens reused over all prompt tokens), and how its requests were routed;
- per replica: state, requests in flight over its decode capacity, the same last-minute figures,
  restarts, and the prefix keys the broker knows its prompt cache holds;
- the last few workers lost, and why.

On a terminal it draws with rich (``Live``) and quits on ``q`` (or Ctrl-C). When stdout is not a
terminal it prints plain ``key=value`` lines instead, one block per refresh, which scripts and
tests read; ``--iterations N`` stops after N refreshes.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

Status = dict[str, Any]
LOSSES_SHOWN = 5


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def broker_line(status: Status) -> str:
    """The broker in one line: pid, restarts, accepting or draining, requests open, recovery."""
    b, rec = status.get("broker") or {}, status.get("recovery") or {}
    accepting = "accepting" if status.get("accepting", True) else "DRAINING"
    return (f"broker pid {b.get('pid', '?')} ({b.get('restarts', 0)} restarts) {accepting}, "
            f"{status.get('requests', 0)} open; recovery: adopted {rec.get('adopted', 0)}, "
            f"parked {rec.get('parked', 0)}; routing {(status.get('routing') or {}).get('policy', '?')}")


def loss_line(loss: dict[str, Any]) -> str:
    """One lost worker: who, how long ago, why."""
    return f"lost {loss.get('worker_id')} (pid {loss.get('pid')}) {loss.get('ago_s', 0):.0f}s ago: {loss.get('reason')}"


# ---- plain lines (stdout not a terminal) ----------------------------------------------------


def _kv(**fields: Any) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items())


def _recent_kv(r: dict[str, Any]) -> dict[str, Any]:
    return {"tok_s": _num(r.get("tok_per_s")), "ttft_p50_s": _num(r.get("ttft_p50_s"), 3),
            "ttft_p99_s": _num(r.get("ttft_p99_s"), 3), "cache_hit": _num(r.get("cache_hit_rate"), 3)}


def plain_lines(status: Status, when: str) -> list[str]:
    """One refresh as ``key=value`` lines: the broker, each model, each replica, the recent losses."""
    b, rec = status.get("broker") or {}, status.get("recovery") or {}
    lines = [f"top {when} " + _kv(broker_pid=b.get("pid", "?"), broker_restarts=b.get("restarts", 0),
                                   accepting="yes" if status.get("accepting", True) else "no",
                                   requests=status.get("requests", 0), adopted=rec.get("adopted", 0),
                                   parked=rec.get("parked", 0), routing=(status.get("routing") or {}).get("policy"))]
    for name, m in sorted((status.get("models") or {}).items()):
        routed = ",".join(f"{k}:{v}" for k, v in sorted((m.get("routed") or {}).items()) if v) or "-"
        lines.append(_kv(model=name, state=m.get("state"), queue=m.get("queue_depth", 0), running=m.get("running", 0),
                         capacity=m.get("capacity", 0), **_recent_kv(m.get("recent") or {}), routed=routed))
        for w in m.get("workers", []):
            lines.append("  " + _kv(replica=w["worker_id"], state=w["state"], in_flight=w.get("in_flight", 0),
                                    capacity=w.get("capacity", 0), **_recent_kv(w.get("recent") or {}),
                                    restarts=w.get("restarts", 0), served=w.get("served", 0),
                                    prefix_keys=(w.get("prefixes") or {}).get("keys", 0)))
    lines += [loss_line(loss) for loss in (status.get("recent_worker_losses") or [])[-LOSSES_SHOWN:]]
    return lines


# ---- the terminal view -----------------------------------------------------------------------


def render(status: Status, connect: str) -> Group:
    """One refresh as rich renderables: a header, one table of models and replicas, the recent losses.

    The table fits 80 columns with names up to 14 characters; longer names widen it.
    """
    models = sorted((status.get("models") or {}).items())
    longest = max([len(n) for n, _ in models] + [len(w["worker_id"]) + 2 for _, m in models for w in m.get("workers", [])]
                  + [len("MODEL/REPLICA")])
    table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
    table.add_column("MODEL/REPLICA", no_wrap=True, min_width=min(32, longest))
    for col in ("STATE", "RUN/CAP", "QUEUE", "TOK/S", "TTFT p50/p99", "HIT", "RESTARTS", "KEYS"):
        table.add_column(col, justify="left" if col == "STATE" else "right", no_wrap=True)
    for name, m in models:
        r = m.get("recent") or {}
        table.add_row(Text(name, style="bold"), m.get("state", "?"), f"{m.get('running', 0)}/{m.get('capacity', 0)}",
                      str(m.get("queue_depth", 0)), _num(r.get("tok_per_s")), _ttft(r), _pct(r.get("cache_hit_rate")),
                      "", "")
        for w in m.get("workers", []):
            wr = w.get("recent") or {}
            style = "green" if w["state"] == "ready" else "yellow" if w["state"] in ("starting", "retiring") else "red"
            table.add_row(f"  {w['worker_id']}", Text(w["state"], style=style),
                          f"{w.get('in_flight', 0)}/{w.get('capacity', 0)}", "", _num(wr.get("tok_per_s")), _ttft(wr),
                          _pct(wr.get("cache_hit_rate")), str(w.get("restarts", 0)),
                          str((w.get("prefixes") or {}).get("keys", 0)))
    losses = [Text(loss_line(loss), style="red") for loss in (status.get("recent_worker_losses") or [])[-LOSSES_SHOWN:]]
    header = Text(f"mlx-fleet top  {connect}  (q quits; rates over the last minute)\n", style="bold")
    header.append(broker_line(status))
    return Group(header, Text(""), table, *([Text("")] + losses if losses else []))


def _ttft(recent: dict[str, Any]) -> str:
    return f"{_ms(recent.get('ttft_p50_s'))}/{_ms(recent.get('ttft_p99_s'))}"


@contextlib.contextmanager
def key_reader(stream: TextIO) -> Iterator[Callable[[float], str]]:
    """``wait(timeout_s)`` returns the keys typed within it ('' when none): cbreak mode on a terminal's stdin."""
    if not stream.isatty():
        def pause(timeout_s: float) -> str:
            time.sleep(timeout_s)
            return ""

        yield pause
        return
    import termios
    import tty

    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        def wait(timeout_s: float) -> str:
            if select.select([fd], [], [], timeout_s)[0]:
                return os.read(fd, 64).decode(errors="replace")
            return ""

        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top(fetch: Callable[[], Status], *, connect: str, interval_s: float = 1.0, iterations: int = 0,
            out: TextIO = sys.stdout, keys: TextIO = sys.stdin) -> int:
    """Show the fleet until ``q``, Ctrl-C or ``iterations`` refreshes (0: no end); 0 when it ended so.

    ``fetch`` is one `status` call; it raising ends a plain run with status 1 and shows the error
    on a terminal (where the next refresh tries again).
    """
    try:
        if not out.isatty():
            return _run_plain(fetch, out, interval_s, iterations)
        return _run_live(fetch, connect, out, keys, interval_s, iterations)
    except KeyboardInterrupt:
        return 0


def _run_plain(fetch: Callable[[], Status], out: TextIO, interval_s: float, iterations: int) -> int:
    done = 0
    while True:
        try:
            status = fetch()
        except Exception as exc:  # the fleet's client raises FleetError, and OSError on a broken socket
            print(f"mlx-fleet: error: {exc}", file=sys.stderr)
            return 1
        out.write("\n".join(plain_lines(status, time.strftime("%Y-%m-%dT%H:%M:%S"))) + "\n\n")
        out.flush()
        done += 1
        if iterations and done >= iterations:
            return 0
        time.sleep(interval_s)


def _run_live(fetch: Callable[[], Status], connect: str, out: TextIO, keys: TextIO, interval_s: float,
              iterations: int) -> int:
    console = Console(file=out)
    done = 0
    with key_reader(keys) as wait, Live(console=console, auto_refresh=False, screen=False) as live:
        while True:
            try:
                view: Any = render(fetch(), connect)
            except Exception as exc:  # shown, and tried again at the next refresh
                view = Text(f"mlx-fleet top  {connect}: no status from the fleet: {exc} (retrying; q quits)",
                            style="red")
            live.update(view, refresh=True)
            done += 1
            if iterations and done >= iterations:
                return 0
            deadline = time.monotonic() + interval_s
            while (left := deadline - time.monotonic()) > 0:
                if "q" in wait(left).lower():
                    return 0
