"""The worker's I/O thread: it owns the DEALER to the broker, so the MLX thread never waits on a socket.

It heartbeats on schedule whatever the MLX thread is doing, reads dispatches and cancels
into the loop's inbox, answers cancels at once (:class:`workers.replies.ReplyLedger`),
encodes and sends what the loop reports while the loop runs its next step, and
reconnects with backoff when the broker goes silent. The loop rings an ``inproc://``
doorbell after each report, so the thread sleeps in one poll on both. The decisions
live in :mod:`workers.link` and :mod:`workers.replies`; this module moves bytes.
"""

from __future__ import annotations

import logging
import queue
import threading

import zmq

from actors.clock import Clock
from actors.curve import CurveKeys, apply_client
from actors.protocol import (
    Cancel, Disconnect, Dispatch, Heartbeat, Message, ProtocolError, Ready, decode, encode,
)
from actors.sockets import make_socket
from workers.link import BrokerLink, Close, InboxItem, Inbound, LoopProgress, LoopReport, Reset, Stop
from workers.replies import ReplyLedger

log = logging.getLogger("mlx_fleet.worker")

BROKER_TYPES = frozenset({"dispatch", "cancel", "heartbeat", "disconnect"})
READ_BATCH = 256  # broker messages read per wake before the outbox gets a turn again


class BrokerIO:
    """The I/O thread and its sockets. ``start()`` it after the model is loaded; it stops at the loop's Close."""

    def __init__(
        self,
        ctx: zmq.Context,
        clock: Clock,
        *,
        worker_id: str,
        connect: str,
        inbox: queue.SimpleQueue[InboxItem],
        outbox: queue.SimpleQueue[LoopReport | Close],
        doorbell: str,
        heartbeat_interval_s: float,
        heartbeat_liveness: int,
        curve: CurveKeys | None = None,
    ) -> None:
        self.ctx = ctx
        self.clock = clock
        self.worker_id = worker_id
        self.connect_addr = connect
        self.inbox = inbox
        self.outbox = outbox
        self.curve = curve
        self.link = BrokerLink(clock, interval_s=heartbeat_interval_s, liveness=heartbeat_liveness)
        self.progress = LoopProgress()
        self.ledger = ReplyLedger(clock)
        self.free_slots = 0
        self.stats: dict | None = None
        self.failed = False
        self.closing = False  # the loop's Close came: send what came before it, then end
        # Bound here so the loop's end can connect at once; used only by the thread after start().
        self.bell = make_socket(ctx, zmq.PAIR)
        self.bell.bind(doorbell)
        self.sock: zmq.Socket | None = None
        self.thread = threading.Thread(target=self.run, name="broker-io", daemon=True)

    def start(self) -> None:
        """Start the thread: connect, then serve until the loop's Close."""
        self.thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end; True when it has."""
        self.thread.join(timeout_s)
        return not self.thread.is_alive()

    # ---- the thread -------------------------------------------------------------

    def run(self) -> None:
        """The thread's body. A failure stops the loop too: a worker without its I/O is no worker."""
        try:
            self._serve()
        except Exception:
            log.exception("the I/O thread failed; stopping the worker")
            self.failed = True
            self.inbox.put(Stop("the I/O thread failed"))
        finally:
            if self.sock is not None:
                self.sock.close(0)
            self.bell.close(0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.bell, zmq.POLLIN)
        self._connect(poller)
        while not self.closing:
            events = dict(poller.poll(self.link.wait_s() * 1000.0))
            if self.bell in events:
                self._drain_bell()
            self._drain_outbox()
            if self.closing:
                return
            # Read whether or not the poll saw it: a message that came while this thread
            # waited for the GIL after a timed-out poll still proves the broker alive.
            self._read_broker()
            due = self.link.due()
            if due == BrokerLink.RECONNECT:
                log.warning("broker silent %.1fs; reconnecting (next try %.1fs later)",
                            self.clock.now() - self.link.last_heard_s, self.link.reconnect_wait_s)
                self._connect(poller)
            elif due == BrokerLink.BEAT:
                self._send(self._heartbeat())

    def _connect(self, poller: zmq.Poller) -> None:
        """(Re)connect the DEALER under our identity; the loop registers for the new epoch."""
        if self.sock is not None:
            poller.unregister(self.sock)
            self.sock.close(0)
        self.sock = make_socket(self.ctx, zmq.DEALER, identity=self.worker_id.encode())
        if self.curve is not None:
            apply_client(self.sock, self.curve)
        self.sock.connect(self.connect_addr)
        poller.register(self.sock, zmq.POLLIN)
        self._reset(self.link.connected(), "connected to the broker")

    def _reset(self, epoch: int, reason: str) -> None:
        self.ledger.reset()
        self.inbox.put(Reset(self.progress.handed(self.clock.now()), epoch, reason))

    def _drain_bell(self) -> None:
        while True:
            try:
                self.bell.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _drain_outbox(self) -> None:
        """Send everything the loop reported, up to its Close."""
        while not self.closing:
            try:
                item = self.outbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Close):
                self.closing = True
                return
            self.progress.reported(item)
            self.free_slots = item.free_slots
            if item.stats is not None:
                self.stats = item.stats
            if item.epoch != self.link.epoch:
                continue  # said about requests the broker has forgotten
            for msg in self.ledger.take(item.out):
                if not isinstance(msg, Ready) or self.link.ready_sent(item.epoch):
                    self._send(msg)

    def _read_broker(self) -> None:
        assert self.sock is not None
        for _ in range(READ_BATCH):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.link.heard()
            try:
                msg = decode(frames, allowed=BROKER_TYPES)
            except ProtocolError as exc:
                log.warning("dropped malformed broker message: %s", exc.message)
                continue
            now = self.clock.now()
            if isinstance(msg, Dispatch):
                self.ledger.opened(msg, now)
                self.inbox.put(Inbound(self.progress.handed(now), msg, now))
            elif isinstance(msg, Cancel):
                self._drain_outbox()  # the freshest usage first
                answer = self.ledger.cancel(msg.request_id)
                for reply in answer:
                    self._send(reply)
                if answer:  # the loop drops it at its next step boundary
                    self.inbox.put(Inbound(self.progress.handed(now), msg, now))
            elif isinstance(msg, Disconnect):
                epoch = self.link.asked_to_register()
                if epoch is not None:
                    log.warning("broker asked us to register again (%s); dropping %d requests",
                                msg.reason, self.ledger.in_flight)
                    self._reset(epoch, msg.reason)

    def _heartbeat(self) -> Heartbeat:
        now = self.clock.now()
        return Heartbeat(self.worker_id, self.ledger.in_flight, self.free_slots, self.stats,
                         steps_completed=self.progress.steps, step_elapsed_s=round(self.progress.elapsed_s(now), 3))

    def _send(self, msg: Message) -> None:
        """Send without blocking; a full pipe means the broker is gone (dropped)."""
        assert self.sock is not None
        try:
            self.sock.send_multipart(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("broker not reading; dropped %s", msg.TYPE)
