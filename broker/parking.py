"""Replies held for clients that have not reconnected to a restarted broker yet: pure, a clock.

A request adopted from a worker's table (:mod:`broker.adoption`) may send output before
its client has reconnected: the frontend cannot route to that client yet. Rather than
treat the client as gone, the broker parks what it has for it, in order, and tries again
on every tick. Once one message to a client is parked, all later ones wait behind it.
A client that is not back within ``return_s``, or that has more than ``max_messages``
parked, is given up on: its requests are cancelled as for any client that is gone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from actors.clock import Clock
from broker.records import Out


@dataclass
class _Parked:
    since_s: float
    outs: deque[Out] = field(default_factory=deque)


class Parking:
    """Messages for clients that cannot be reached yet, per client, in order."""

    def __init__(self, clock: Clock, *, return_s: float = 10.0, max_messages: int = 1000) -> None:
        self.clock = clock
        self.return_s = return_s
        self.max_messages = max_messages
        self._clients: dict[bytes, _Parked] = {}
        self.parked_total = 0  # messages parked so far (for status)

    def __len__(self) -> int:
        return sum(len(p.outs) for p in self._clients.values())

    def holds(self, client: bytes) -> bool:
        """True when messages for ``client`` wait: a new one must wait behind them."""
        return client in self._clients

    def park(self, out: Out) -> None:
        """Keep ``out`` for its client."""
        parked = self._clients.setdefault(out.identity, _Parked(self.clock.now()))
        parked.outs.append(out)
        self.parked_total += 1

    def flush(self, try_send: Callable[[Out], bool]) -> list[bytes]:
        """Send what can go now, in order; returns the clients given up on (not back in time, or too far behind)."""
        now = self.clock.now()
        gone: list[bytes] = []
        for client, parked in list(self._clients.items()):
            while parked.outs and try_send(parked.outs[0]):
                parked.outs.popleft()
            if not parked.outs:
                del self._clients[client]
            elif now - parked.since_s >= self.return_s or len(parked.outs) > self.max_messages:
                del self._clients[client]
                gone.append(client)
        return gone
