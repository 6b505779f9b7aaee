"""How a worker's two threads talk, and what the I/O thread knows of the broker and the loop.

Pure: no sockets, no threads, a clock. The MLX thread (the actor loop) and the I/O
thread (the DEALER to the broker) share no mutable state; they hand each other the
immutable items below through two queues:

- the loop's inbox, filled by the I/O thread: :class:`Inbound` (a dispatch or a cancel,
  numbered, with its arrival time), :class:`Reset` (register again: the broker forgot
  us, or we reconnected) and :class:`Stop`;
- the I/O thread's outbox, filled by the loop: one :class:`LoopReport` per loop turn
  (what to send, and how far the loop has got), then :class:`Close`.

:class:`BrokerLink` decides when to heartbeat, when the broker counts as gone (reconnect,
with backoff) and whether this worker is registered. Each (re)registration opens a new
*epoch*: what the loop says about an older epoch is dropped, so no late output of a
forgotten request reaches the broker. :class:`LoopProgress` tells, for each heartbeat,
how long the loop has been busy without finishing a turn.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from actors.clock import Clock
from actors.protocol import Cancel, Dispatch
from workers.replies import Outgoing

BACKOFF_FIRST_S = 0.5  # extra silence before the next reconnect: 0, then this, doubling
BACKOFF_MAX_S = 8.0


@dataclass(frozen=True)
class Inbound:
    """A broker message for the loop; ``seq`` numbers what the I/O thread handed over."""

    seq: int
    msg: Dispatch | Cancel
    arrived_s: float


@dataclass(frozen=True)
class Reset:
    """Forget every request and say ``ready`` for ``epoch``."""

    seq: int
    epoch: int
    reason: str


@dataclass(frozen=True)
class Stop:
    """End the loop (SIGTERM, or the I/O thread failed)."""

    reason: str


InboxItem = Inbound | Reset | Stop


@dataclass(frozen=True)
class LoopReport:
    """One loop turn, for the I/O thread: what to send and the loop's progress.

    ``consumed`` is the last inbox ``seq`` the loop has taken; ``step_began_s`` is when
    the step now starting began, None when the loop goes on to wait for input.
    ``stats`` (engine and policy figures) is sent about once per heartbeat interval.
    """

    epoch: int
    consumed: int
    steps: int
    step_began_s: float | None
    out: list[Outgoing] = field(default_factory=list)
    free_slots: int = 0
    stats: dict[str, Any] | None = None


@dataclass(frozen=True)
class Close:
    """The loop's last item: send what came before, then close."""


class LoopProgress:
    """How long the MLX loop has been busy without finishing a turn, as the I/O thread sees it.

    The loop is busy from the moment it is handed an item it has not yet reported
    taking, and from the start of each step it reports; it is idle once it reports
    that it waits with nothing left unread.
    """

    def __init__(self) -> None:
        self.seq = 0  # items handed to the loop so far
        self.steps = 0  # engine steps the loop has completed
        self._step_began_s: float | None = None
        self._handed: deque[tuple[int, float]] = deque()  # (seq, when) not yet taken

    def handed(self, now_s: float) -> int:
        """One more item for the loop; returns its seq."""
        self.seq += 1
        self._handed.append((self.seq, now_s))
        return self.seq

    def reported(self, report: LoopReport) -> None:
        """The loop's own word: what it has taken, steps done, and whether a step runs."""
        while self._handed and self._handed[0][0] <= report.consumed:
            self._handed.popleft()
        self.steps = report.steps
        self._step_began_s = report.step_began_s

    def busy_since_s(self) -> float | None:
        """Since when the loop has owed progress; None when it is idle."""
        times = [t for t in (self._step_began_s, self._handed[0][1] if self._handed else None) if t is not None]
        return min(times) if times else None

    def elapsed_s(self, now_s: float) -> float:
        """Seconds since the loop last made progress while it had work; 0 when idle."""
        since = self.busy_since_s()
        return 0.0 if since is None else max(0.0, now_s - since)


class BrokerLink:
    """Heartbeats, broker liveness with reconnect backoff, and registration epochs."""

    RECONNECT = "reconnect"
    BEAT = "beat"

    def __init__(self, clock: Clock, *, interval_s: float, liveness: int) -> None:
        self.clock = clock
        self.interval_s = interval_s
        self.liveness_s = interval_s * liveness
        self.epoch = 0
        self.registered = False  # `ready` went out for this epoch
        self.last_heard_s = clock.now()
        self.next_beat_s = self.last_heard_s
        self.reconnect_wait_s = 0.0

    def connected(self) -> int:
        """A fresh connection: a new epoch, not registered yet; the silence is counted from now."""
        self.epoch += 1
        self.registered = False
        self.last_heard_s = self.next_beat_s = self.clock.now()
        return self.epoch

    def heard(self) -> None:
        """Any message from the broker: it is alive, so the reconnect backoff starts over."""
        self.last_heard_s = self.clock.now()
        self.reconnect_wait_s = 0.0

    def asked_to_register(self) -> int | None:
        """The broker does not know us: a new epoch, or None when a registration is already owed."""
        if not self.registered:
            return None
        self.epoch += 1
        self.registered = False
        return self.epoch

    def ready_sent(self, epoch: int) -> bool:
        """The loop's ``ready`` for ``epoch``: True when it is current (send it), False when stale."""
        if epoch != self.epoch:
            return False
        self.registered = True
        return True

    def due(self) -> str | None:
        """What is due now: RECONNECT (broker silent too long), BEAT, or None."""
        now = self.clock.now()
        silent_s = now - self.last_heard_s
        if silent_s >= self.liveness_s + self.reconnect_wait_s:
            self.reconnect_wait_s = min(max(BACKOFF_FIRST_S, self.reconnect_wait_s * 2), BACKOFF_MAX_S)
            return self.RECONNECT
        if now >= self.next_beat_s:
            self.next_beat_s = now + self.interval_s
            # The broker ignores beats from a worker it has not registered; `ready` comes first.
            return self.BEAT if self.registered else None
        return None

    def wait_s(self) -> float:
        """Seconds until ``due`` may have something to do."""
        now = self.clock.now()
        reconnect_at_s = self.last_heard_s + self.liveness_s + self.reconnect_wait_s
        return max(0.0, min(self.next_beat_s, reconnect_at_s) - now)
