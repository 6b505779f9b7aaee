"""How a worker's two threads talk, and what the I/O thread knows of the broker and the loop.

Pure: no sockets, no threads, a clock. The MLX thread (the actor loop) and the I/O
thread (the DEALER to the broker) share no mutable state; they hand each other the
immutable items below through two queues:

- the loop's inbox, filled by the I/O thread: :class:`Inbound` (a dispatch or a cancel,
  numbered, with its arrival time), :class:`Register` (a broker is there: say you are
  alive, so that the I/O thread registers), :class:`Reset` (drop every request: the
  broker was lost for longer than the grace) and :class:`Stop`;
- the I/O thread's outbox, filled by the loop: one :class:`LoopReport` per loop turn
  (what to send, and how far the loop has got), then :class:`Close`.

:class:`BrokerLink` decides when to heartbeat, when the broker counts as gone (reconnect,
with backoff), when to register, and when a lost broker's grace has run out. Requests
outlive a lost broker for that grace; each :class:`Reset` that drops them opens a new
*generation*, and what the loop says about an older generation is dropped, so no late
output of a forgotten request reaches the broker. :class:`LoopProgress` tells, for each
heartbeat, how long the loop has been busy without finishing a turn.
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
class Register:
    """The loop's answer (``LoopReport.ready_for``) lets the I/O thread register: a hung loop never does."""

    seq: int
    registration: int


@dataclass(frozen=True)
class Reset:
    """Forget every request; the loop's reports carry ``generation`` from then on."""

    seq: int
    generation: int
    reason: str


@dataclass(frozen=True)
class Stop:
    """End the loop (SIGTERM, or the I/O thread failed)."""

    reason: str


@dataclass(frozen=True)
class Wake:
    """Look again: a request's grammar finished compiling (sent by the compile pool, not the I/O thread)."""


InboxItem = Inbound | Register | Reset | Stop | Wake


@dataclass(frozen=True)
class LoopReport:
    """One loop turn, for the I/O thread: what to send and the loop's progress.

    ``generation`` is the last :class:`Reset` the loop has taken (0 before any);
    ``ready_for`` the last :class:`Register` it has answered;
    ``consumed`` is the last inbox ``seq`` the loop has taken; ``step_began_s`` is when
    the step now starting began, None when the loop goes on to wait for input.
    ``stats`` (engine and policy figures) is sent about once per heartbeat interval.
    ``cache_labels`` lists the prompt cache's entries (by the key of the request that
    stored each) when they changed since the last report; None when they did not.
    """

    generation: int
    consumed: int
    steps: int
    step_began_s: float | None
    out: list[Outgoing] = field(default_factory=list)
    free_slots: int = 0
    stats: dict[str, Any] | None = None
    ready_for: int = 0
    cache_labels: list[str] | None = None


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
    """Heartbeats, broker liveness with reconnect backoff, registration, and the grace of a lost broker.

    Each fresh connection is a new *epoch*. The worker registers (``ready``, with its
    in-flight table) once the connection's handshake has succeeded (:meth:`greet`) and
    the MLX loop has answered that it is alive (ASK_LOOP, then :meth:`loop_ready`), and
    again whenever the broker asks. From the moment it has no broker that knows its
    requests (``away``) until it registers again, its output is kept rather than sent;
    past ``grace_s`` of that, GIVE_UP: it drops every request.
    """

    RECONNECT = "reconnect"
    BEAT = "beat"
    ASK_LOOP = "ask_loop"
    GIVE_UP = "give_up"

    def __init__(self, clock: Clock, *, interval_s: float, liveness: int, grace_s: float = 10.0) -> None:
        self.clock = clock
        self.interval_s = interval_s
        self.liveness_s = interval_s * liveness
        self.grace_s = grace_s
        self.epoch = 0
        self.registered = False  # `ready` went out on this connection, and no request to register since
        self.greeted = False  # this connection's handshake succeeded: a broker is there
        self.registration = 0  # registrations owed so far (one per connection or request to register)
        self.asked = 0  # the last one the loop was asked to confirm
        self.confirmed = 0  # the last one the loop confirmed
        self.lost_since_s: float | None = None  # since when no broker has our table
        self.last_heard_s = clock.now()
        self.next_beat_s = self.last_heard_s
        self.reconnect_wait_s = 0.0

    @property
    def away(self) -> bool:
        """No broker knows this worker's requests: keep their output, do not send it."""
        return not self.registered

    def connected(self) -> int:
        """A fresh connection: a new epoch, not registered yet; the silence is counted from now."""
        self.epoch += 1
        self._unregister()
        self.greeted = False
        self.last_heard_s = self.next_beat_s = self.clock.now()
        return self.epoch

    def greet(self) -> None:
        """The connection's handshake succeeded: time to register."""
        self.greeted = True

    def heard(self) -> None:
        """Any message from the broker: it is alive, so the reconnect backoff starts over."""
        self.last_heard_s = self.clock.now()
        self.reconnect_wait_s = 0.0

    def asked_to_register(self) -> bool:
        """The broker does not know us: True, or False when a registration is already owed."""
        if not self.registered:
            return False
        self._unregister()
        return True

    def loop_ready(self, registration: int) -> None:
        """The loop answered the ASK_LOOP of ``registration``."""
        self.confirmed = max(self.confirmed, registration)

    @property
    def _ask_owed(self) -> bool:
        """A broker is there, we are not registered with it, and the loop has not been asked for this registration."""
        return self.greeted and not self.registered and self.asked != self.registration

    def may_register(self) -> bool:
        """True when ``ready`` should go out now: a broker is there and the loop has answered."""
        return self.greeted and not self.registered and self.confirmed == self.registration

    def ready_sent(self) -> None:
        """``ready`` (with the in-flight table) went out: this broker has our requests."""
        self.registered = True
        self.lost_since_s = None

    def due(self) -> str | None:
        """What is due now: GIVE_UP, RECONNECT (broker silent too long), ASK_LOOP, BEAT, or None."""
        now = self.clock.now()
        if self.lost_since_s is not None and now - self.lost_since_s >= self.grace_s:
            self.lost_since_s = None  # once: what comes later registers with nothing
            return self.GIVE_UP
        silent_s = now - self.last_heard_s
        if silent_s >= self.liveness_s + self.reconnect_wait_s:
            self.reconnect_wait_s = min(max(BACKOFF_FIRST_S, self.reconnect_wait_s * 2), BACKOFF_MAX_S)
            return self.RECONNECT
        if self._ask_owed:
            self.asked = self.registration
            return self.ASK_LOOP
        if now >= self.next_beat_s:
            self.next_beat_s = now + self.interval_s
            # The broker ignores beats from a worker it has not registered; `ready` comes first.
            return self.BEAT if self.registered else None
        return None

    def wait_s(self) -> float:
        """Seconds until ``due`` may have something to do."""
        now = self.clock.now()
        if self._ask_owed:
            return 0.0
        times = [self.next_beat_s, self.last_heard_s + self.liveness_s + self.reconnect_wait_s]
        if self.lost_since_s is not None:
            times.append(self.lost_since_s + self.grace_s)
        return max(0.0, min(times) - now)

    def _unregister(self) -> None:
        self.registered = False
        self.registration += 1
        if self.lost_since_s is None:
            self.lost_since_s = self.clock.now()
