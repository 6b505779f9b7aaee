"""How every fleet process runs: logging, signals, and three phases (start, loop, stop).

A process entry point (``run_broker``, ``run_worker``, ...) builds its actor
and hands :func:`run_process` four hooks, in the spirit of Pykka's actor
lifecycle:

- ``start``: bind, connect, load. A :class:`StartError` here (or in ``loop``)
  logs its one-line message and exits with status 1.
- ``loop``: serve until a stop is requested.
- ``stop``: close what was opened; it runs however the first two ended.
- ``request_stop``: called from the SIGTERM handler, so it only sets state.
- ``request_handover`` (optional): called from the SIGUSR1 handler: leave at once,
  handing the process's work on (the broker's planned restart).

SIGINT is ignored: under the supervisor, Ctrl-C reaches the whole process
group, and the supervisor alone decides the order in which children drain.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Callable

from actors.logs import setup_logging

log = logging.getLogger("mlx_fleet.runtime")


class StartError(RuntimeError):
    """The process cannot serve (a port in use, a bad setting); the message names what to change."""


@dataclass(frozen=True)
class Hooks:
    """The calls :func:`run_process` makes on a process's actor: every actor's lifecycle is
    ``start`` (bind, load), ``run`` (until asked to stop), ``close`` (always, even after a failed start)."""

    start: Callable[[], None]
    run: Callable[[], None]
    close: Callable[[], None]
    request_stop: Callable[[], None]
    request_handover: Callable[[], None] | None = None


def run_process(actor_name: str, log_level: str, make_hooks: Callable[[], Hooks]) -> None:
    """Set up logging and signals, then start, run and close the actor ``make_hooks`` builds."""
    setup_logging(log_level, actor_name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    hooks = make_hooks()
    signal.signal(signal.SIGTERM, lambda *_: hooks.request_stop())
    if hooks.request_handover is not None:
        handover = hooks.request_handover
        signal.signal(signal.SIGUSR1, lambda *_: handover())
    try:
        hooks.start()
        hooks.run()
    except StartError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    finally:
        hooks.close()
    log.info("%s stopped", actor_name)
