"""The worker's I/O thread: it owns the DEALER to the broker, so the MLX thread never waits on a socket.

It heartbeats on schedule whatever the MLX thread is doing, reads dispatches and cancels
into the loop's inbox, answers cancels at once (:class:`workers.replies.ReplyLedger`),
encodes and sends what the loop reports while the loop runs its next step, and
reconnects with backoff when the broker goes silent. It also tells the broker which prefixes
its prompt cache holds (``prefixes``, :mod:`workers.prefix_report`): the keys of each finished
request's prompt and answer, when the loop reports that the cache kept it, ahead of that request's
``done``, and all of them after every ``ready``. The loop rings an ``inproc://``
doorbell after each report, so the thread sleeps in one poll on both. The decisions
live in :mod:`workers.link` and :mod:`workers.replies`; this module moves bytes.

When the broker is lost (its connection drops, it goes silent, or it asks us to register
again), the requests go on decoding and their output is kept in the ledger. As soon as a
broker's handshake succeeds on a fresh connection and the loop has said it is alive, the
thread sends ``ready`` with the in-flight table, then every kept request's output from its
start, then carries on. A broker that does not come back within ``recovery_grace_s`` makes
the loop drop everything.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from actors.clock import Clock
from actors.curve import CurveKeys, apply_client
from actors.prefix_keys import entry_keys
from actors.protocol import (
    Cancel, Disconnect, Dispatch, Done, Heartbeat, Message, ProtocolError, Ready, decode, encode,
)
from actors.sockets import make_socket, poll_ms
from workers.link import BrokerLink, Close, InboxItem, Inbound, LoopProgress, LoopReport, Register, Reset, Stop
from workers.prefix_report import PrefixReporter
from workers.replies import Outgoing, ReplyLedger

log = logging.getLogger("mlx_fleet.worker")

BROKER_TYPES = frozenset({"dispatch", "cancel", "heartbeat", "disconnect"})
LINK_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
READ_BATCH = 256  # broker messages read per wake before the outbox gets a turn again


class BrokerIO:
    """The I/O thread and its sockets. ``start()`` it after the model is loaded; it stops at the loop's Close."""

    def __init__(
        self,
        ctx: zmq.SyncContext,
        clock: Clock,
        *,
        worker_id: str,
        connect: str,
        inbox: queue.SimpleQueue[InboxItem],
        outbox: queue.SimpleQueue[LoopReport | Close],
        doorbell: str,
        heartbeat_interval_s: float,
        heartbeat_liveness: int,
        ready: Ready,
        grace_s: float = 10.0,
        buffer_bytes: int = 64 * 1024 * 1024,
        curve: CurveKeys | None = None,
    ) -> None:
        self.ctx = ctx
        self.clock = clock
        self.worker_id = worker_id
        self.connect_addr = connect
        self.inbox = inbox
        self.outbox = outbox
        self.curve = curve
        self.ready = ready  # what we say when registering; the in-flight table is added each time
        self.link = BrokerLink(clock, interval_s=heartbeat_interval_s, liveness=heartbeat_liveness, grace_s=grace_s)
        self.progress = LoopProgress()
        # A terminal is kept until a lost broker would have been noticed: then it cannot still be in flight.
        self.ledger = ReplyLedger(clock, budget_bytes=buffer_bytes, linger_s=self.link.liveness_s + heartbeat_interval_s)
        self.ledger.away = True
        self.prefixes = PrefixReporter(worker_id)  # the prompt cache's prefix keys, as the broker should know them
        self.generation = 0  # the loop's reports of an older generation speak of dropped requests
        self.free_slots = 0
        self.stats: dict[str, Any] | None = None
        self.failed = False
        self.closing = False  # the loop's Close came: send what came before it, then end
        # Bound here so the loop's end can connect at once; used only by the thread after start().
        self.bell = make_socket(ctx, zmq.PAIR)
        self.bell.bind(doorbell)
        self.sock: zmq.SyncSocket | None = None
        self.monitor: zmq.SyncSocket | None = None
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
            self._close_socket()
            self.bell.close(0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.bell, zmq.POLLIN)
        self._connect(poller)
        while not self.closing:
            events = dict(poller.poll(poll_ms(self.link.wait_s())))
            if self.bell in events:
                self._drain_bell()
            self._drain_outbox()
            if self.closing:
                return
            # Read whether or not the poll saw it: a message that came while this thread
            # waited for the GIL after a timed-out poll still proves the broker alive.
            self._read_broker()
            if self._link_dropped():
                self._lose("the connection to the broker dropped")
                self._connect(poller)
            self._act(self.link.due(), poller)
            if self.link.may_register():
                self._register()
            self.ledger.expire()

    def _act(self, due: str | None, poller: zmq.Poller) -> None:
        """Do what the link says is due."""
        if due == BrokerLink.RECONNECT:
            log.warning("broker silent %.1fs; reconnecting (next try %.1fs later)",
                        self.clock.now() - self.link.last_heard_s, self.link.reconnect_wait_s)
            self._lose("the broker went silent")
            self._connect(poller)
        elif due == BrokerLink.ASK_LOOP:  # a hung loop never answers: such a worker does not register
            self.inbox.put(Register(self.progress.handed(self.clock.now()), self.link.registration))
        elif due == BrokerLink.BEAT:
            self._send(self._heartbeat())
        elif due == BrokerLink.GIVE_UP:
            self._give_up()

    def _connect(self, poller: zmq.Poller) -> None:
        """(Re)connect the DEALER under our identity, with a monitor; we register once its handshake succeeds.

        A fresh socket, not ZeroMQ's own reconnect: what the old one still queued would
        reach a new broker before our ``ready``.
        """
        if self.sock is not None:
            poller.unregister(self.sock)
            poller.unregister(self.monitor)
            self._close_socket()
        self.sock = make_socket(self.ctx, zmq.DEALER, identity=self.worker_id.encode())
        if self.curve is not None:
            apply_client(self.sock, self.curve)
        self.monitor = self.sock.get_monitor_socket(LINK_EVENTS)
        self.sock.connect(self.connect_addr)
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        self.link.connected()

    def _close_socket(self) -> None:
        if self.sock is None:
            return
        self.sock.disable_monitor()
        if self.monitor is not None:
            self.monitor.close(0)
        self.sock.close(0)
        self.sock = self.monitor = None

    def _link_dropped(self) -> bool:
        """Read the monitor: note a handshake; True when the connection dropped."""
        assert self.monitor is not None
        dropped = False
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.link.greet()
            elif event == zmq.EVENT_DISCONNECTED:
                dropped = True
        return dropped

    def _lose(self, why: str) -> None:
        """No broker has our requests now: keep their output until one does (or the grace ends)."""
        if not self.ledger.away and self.ledger.in_flight:
            log.warning("%s; keeping %d requests in flight (and %d answered) for up to %.1fs", why,
                        self.ledger.in_flight, self.ledger.held - self.ledger.in_flight, self.link.grace_s)
        self.ledger.go_away()
        self._cancel_overflowed()

    def _register(self) -> None:
        """``ready`` with the in-flight table, then every kept request's output from its start."""
        table = self.ledger.table()
        ready = dataclasses.replace(self.ready, requests=table or None)
        self._send(ready)
        for msg in self.ledger.replay():
            self._send(msg)
        self.prefixes.owe_full()  # this broker knows nothing of our prompt cache yet
        self._send_prefixes()
        self.link.ready_sent()
        self.ledger.away = False
        if table:
            log.info("registered again; handed %d requests to the broker", len(table))

    def _give_up(self) -> None:
        """The grace ran out: drop every request (the loop too) and register with nothing."""
        if self.ledger.held:
            log.warning("no broker took our requests within %.1fs (recovery_grace_s); dropping %d",
                        self.link.grace_s, self.ledger.held)
        self.ledger.reset()
        self.ledger.away = True
        self.generation += 1
        self.inbox.put(Reset(self.progress.handed(self.clock.now()), self.generation, "broker lost past the grace"))

    def _cancel_overflowed(self) -> None:
        """Requests the ledger ended for its budget: the loop stops decoding them."""
        now = self.clock.now()
        for key in self.ledger.take_overflowed():
            self.inbox.put(Inbound(self.progress.handed(now), Cancel(key), now))

    def _drain_bell(self) -> None:
        while True:
            try:
                self.bell.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _drain_outbox(self) -> None:
        """Send everything the loop reported, up to its Close (kept, not sent, while the broker is away)."""
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
            self.link.loop_ready(item.ready_for)
            if item.generation != self.generation:
                self._note_cache([], item.cache_labels)
                continue  # said about requests dropped since
            msgs = self.ledger.take(item.out)
            self._note_cache(item.out, item.cache_labels)
            self._cancel_overflowed()
            if not self.link.away:
                self._send_prefixes()  # before the done: the broker knows the prefix before the next turn comes
                for msg in msgs:
                    self._send(msg)

    def _note_cache(self, out: list[Outgoing], labels: list[str] | None) -> None:
        """The prefix keys of the requests that finished, and which of them the prompt cache holds now."""
        for item in out:
            if isinstance(item, Done) and item.finish_reason != "cancelled":
                found = self.ledger.output_of(item.request_id)
                if found is not None and found[0].cache:
                    req, text, ids = found
                    self.prefixes.finished(item.request_id, entry_keys(
                        req.prompt, req.messages, req.prompt_tokens, answer_text=text, answer_tokens=ids))
        if labels is not None:
            self.prefixes.cache_now(labels)

    def _send_prefixes(self) -> None:
        """Tell the broker what the prompt cache gained and lost; a report it missed makes the next one full."""
        for msg in self.prefixes.reports():
            if not self._send(msg):
                self.prefixes.owe_full()
                return

    def _read_broker(self) -> None:
        assert self.sock is not None
        for _ in range(READ_BATCH):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.link.heard()
            try:  # a newer broker may add fields: ignore those we do not know
                msg = decode(frames, allowed=BROKER_TYPES, ignore_unknown=True)
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
            elif isinstance(msg, Disconnect) and self.link.asked_to_register():
                self._lose(f"the broker asked us to register again ({msg.reason})")

    def _heartbeat(self) -> Heartbeat:
        now = self.clock.now()
        return Heartbeat(self.worker_id, self.ledger.in_flight, self.free_slots, self.stats,
                         steps_completed=self.progress.steps, step_elapsed_s=round(self.progress.elapsed_s(now), 3))

    def _send(self, msg: Message) -> bool:
        """Send without blocking; a full pipe means the broker is gone (dropped: False)."""
        assert self.sock is not None
        try:
            self.sock.send_multipart(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("broker not reading; dropped %s", msg.TYPE)
            return False
        return True
