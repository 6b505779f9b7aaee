"""The broker actor: a ROUTER for clients, a ROUTER for workers, one poll loop.

All decisions live in :class:`broker.state.BrokerState` (and, for what a restarted
broker takes over, :mod:`broker.adoption` and :mod:`broker.parking`); this module only
decodes, calls a handler and sends what it returns. No message can raise out
of the loop: decoding errors become ``bad_request`` replies or counted drops.

A client is gone when its connection drops (the frontend's socket monitor,
mapped to routing ids by :class:`broker.connections.ClientConnections`), when a
send to it fails because it is unreachable, or when ``client_hwm`` messages
wait for it (it is not reading). Its open requests then end at once, streamed
or not, and the log gets one line for it.

SIGTERM drains: new requests are refused, the running ones finish (or fail at
``drain_timeout_s``). SIGUSR1 hands over: the broker exits at once and leaves its
running requests to the workers, which give them to the next broker.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from actors.clock import MonotonicClock
from actors.config import FleetConfig
from actors.control import CONTROL_TYPES, TO_BROKER, control_addr
from actors.curve import check_bind_policy, start_server_auth
from actors.metrics import events_addr, make_event_sender
from actors.protocol import (
    CLIENT_TYPES, DEFAULT_LIMITS, UNAVAILABLE, WORKER_TYPES,
    Cancel, Disconnect, Generate, Load, Message, Models, ModelsReply, ProtocolError,
    Ready, Status, StatusReply, Unload, encode, encode_map, error_for, from_map, unpack_frames,
)
from actors.runtime import Hooks, StartError, run_process
from actors.sockets import make_socket, poll_ms
from actors.wire_scan import peek_field
from broker.connections import ClientConnections, client_name
from broker.adoption import Adoption
from broker.lifecycle import ModelControl
from broker.parking import Parking
from broker.records import Dest, Out
from broker.routing import RoutingSettings
from broker.state import BrokerState
from broker.status import make_status, models_summary
from broker.telemetry import make_broker_event

log = logging.getLogger("mlx_fleet.broker")

METRICS_INTERVAL_S = 1.0  # one `broker` metric event per second


def _frames(out: Out) -> list[bytes]:
    """The wire frames of an outgoing message (a typed message, or a map the state built)."""
    return encode(out.body) if isinstance(out.body, Message) else encode_map(out.body)


class BrokerActor:
    """Owns the sockets and the state; ``run()`` until drained."""

    def __init__(self, cfg: FleetConfig, *, ctx: zmq.SyncContext | None = None) -> None:
        self.cfg = cfg
        self.clock = MonotonicClock()
        self.state = BrokerState(
            self.clock, models=[m.name for m in cfg.models], queue_limit=cfg.queue_limit,
            heartbeat_interval_s=cfg.heartbeat_interval_s, heartbeat_liveness=cfg.heartbeat_liveness,
            default_timeout_s=cfg.request_timeout_s, no_worker_timeout_s=cfg.no_worker_timeout_s,
            hung_step_s=cfg.hung_step_s, routing=RoutingSettings.of(cfg),
            key_prefix=f"b{os.urandom(4).hex()}.",  # this process's own: adopted keys come from others
        )
        self.adoption = Adoption(self.state, self.clock, window_s=cfg.adoption_window_s)
        self.parking = Parking(self.clock, return_s=cfg.client_return_s, max_messages=cfg.client_hwm)
        self.ctx = ctx or zmq.Context()
        # A client more than client_hwm messages behind is "not reading": its requests are cancelled.
        # A frame over max_frame_bytes drops that client's connection (docs/protocol.md, Limits).
        self.frontend = make_socket(self.ctx, zmq.ROUTER, hwm=cfg.client_hwm, max_msg_bytes=DEFAULT_LIMITS.max_frame_bytes)
        # Clients set their own routing id; one that reconnects takes its id over from a stale connection.
        self.frontend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # A small kernel send buffer per connection keeps that backlog in ZeroMQ's count over tcp too.
        if cfg.client_sndbuf_bytes > 0:
            self.frontend.setsockopt(zmq.SNDBUF, cfg.client_sndbuf_bytes)
        self.monitor = self.frontend.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.connections = ClientConnections()
        self.backend = make_socket(self.ctx, zmq.ROUTER)
        # A restarted worker reconnects under the same identity and must take it over.
        self.backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.malformed_dropped = 0
        self.malformed_logged_s = float("-inf")
        self.drain_deadline_s: float | None = None
        self.stop_requested = False
        self.handover_requested = False
        self.events = make_event_sender(events_addr(cfg.metrics_export, cfg.metrics_events), "broker", ctx=self.ctx)
        # The supervisor's channel (actors/control.py): its state, and runtime model management.
        self.control_sock: zmq.SyncSocket | None = None
        if cfg.runtime_dir:
            self.control_sock = make_socket(self.ctx, zmq.DEALER)
            self.control_sock.connect(control_addr(cfg.runtime_dir))
        self.lifecycle = ModelControl(
            self.state, self.clock, supervised=self.control_sock is not None,
            on_demand={m.name: m.idle_unload_s for m in cfg.models if m.on_demand},
            drain_timeout_s=cfg.drain_timeout_s,
        )
        self.auth: ThreadAuthenticator | None = None

    def start(self) -> None:
        """Bind both endpoints (CurveZMQ servers when configured); StartError naming the address."""
        for warning in check_bind_policy(self.cfg):
            log.warning("%s", warning)
        if self.cfg.curve_server_secret:
            self.auth = start_server_auth(self.ctx, self.cfg, [self.frontend, self.backend])
            log.info("CurveZMQ on: serving keys in %s", self.cfg.curve_authorized_dir)
        for sock, addr in ((self.frontend, self.cfg.frontend), (self.backend, self.cfg.backend)):
            try:
                sock.bind(addr)
            except zmq.ZMQError as exc:
                raise StartError(f"cannot bind {addr}: {exc.strerror}") from None
        log.info("broker on %s (clients) and %s (workers)", self.cfg.frontend, self.cfg.backend)

    # ---- sending ------------------------------------------------------------------

    def send(self, outs: list[Out]) -> None:
        """Send each Out; an unreachable or non-reading client is cancelled."""
        while outs:
            out = outs.pop(0)
            frames = _frames(out)
            if out.to is Dest.CONTROL:
                self.send_control(frames)
                continue
            sock = self.frontend if out.to is Dest.CLIENT else self.backend
            if out.to is Dest.CLIENT and self.parking.holds(out.identity):
                self.parking.park(out)  # behind what already waits for that client
                continue
            try:
                sock.send_multipart([out.identity, *frames], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN (never reads)
                if out.to is Dest.CLIENT and exc.errno == zmq.EHOSTUNREACH and self.adoption.awaits(out.identity):
                    self.parking.park(out)  # its request outlived the last broker; it may not be back yet
                    continue
                self.state.counters["dropped"] += 1
                if out.to is Dest.CLIENT:
                    why = (f"not reading ({self.cfg.client_hwm} messages waiting, client_hwm)" if exc.errno == zmq.EAGAIN
                           else f"unreachable ({exc.strerror})")
                    outs.extend(self.state.client_gone(out.identity, why))
                elif out.identity in self.state.workers:
                    log.warning("worker %r unreachable: %s", out.identity, exc.strerror)
                    outs.extend(self.state.worker_gone(out.identity, f"unreachable: {exc.strerror}"))

    # ---- receiving ------------------------------------------------------------------

    def handle_frontend(self) -> None:
        """One client message."""
        first = self.frontend.recv(copy=False)
        body = self.frontend.recv_multipart() if first.more else []
        identity, fd = first.bytes, _source_fd(first)
        if fd >= 0 and self.connections.fd_of.get(identity) != fd:
            # A new client, or a new connection: first the events of connections closed before it (broker.connections).
            self.handle_monitor()
            self.connections.seen(identity, fd)
        raw: dict[str, Any] | None = None
        try:
            raw = unpack_frames(body)
            msg = from_map(raw, allowed=CLIENT_TYPES)
        except ProtocolError as exc:
            err = error_for(exc)
            # Labelled with the model it named, when this fleet serves it (read even from a payload refused whole).
            named = raw.get("model") if raw is not None else None
            if raw is None and len(body) == 2:
                named = peek_field(body[1], DEFAULT_LIMITS, "model")
            self.state.count_refusal(named, err)
            self.send([Out(Dest.CLIENT, identity, err)])
            return
        handlers: dict[type[Message], Callable[[Any], list[Out]]] = {
            Generate: lambda m: self.adoption.handle_generate(identity, m) + self.lifecycle.after_generate(m.model),
            Cancel: lambda m: self.adoption.handle_cancel(identity, m.request_id),
            Models: lambda m: [Out(Dest.CLIENT, identity, ModelsReply(models=self.models_list(), request_id=m.request_id))],
            Status: lambda m: [Out(Dest.CLIENT, identity, StatusReply(status=self.status(), request_id=m.request_id))],
            Load: lambda m: self.lifecycle.handle_load(identity, m),
            Unload: lambda m: self.lifecycle.handle_unload(identity, m),
        }
        self.send(handlers[type(msg)](msg))

    def handle_monitor(self) -> None:
        """Connection events of the frontend: a client whose connection dropped is gone."""
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            fd = event["value"]
            gone = (self.connections.closed(fd) if event["event"] == zmq.EVENT_DISCONNECTED
                    else self.connections.accepted(fd))
            for identity in gone:
                self.send(self.state.client_gone(identity, "disconnected"))

    def handle_backend(self) -> None:
        """One worker message."""
        frames = self.backend.recv_multipart(copy=True)
        identity, body = frames[0], frames[1:]
        try:
            raw = unpack_frames(body)
            msg = from_map(raw, allowed=WORKER_TYPES)
        except ProtocolError as exc:
            self.malformed_dropped += 1
            self._log_malformed(exc.message)
            return
        if identity not in self.state.workers and identity.decode(errors="replace") in self.lifecycle.retired:
            return  # a worker on its way out: let it go quiet
        if isinstance(msg, Ready):
            if not self.lifecycle.accept_ready(msg):
                return
            log.info("worker %s ready for %s (capacity %d, pid %d, host %s, holding %d requests)", msg.worker_id,
                     msg.model, msg.capacity, msg.pid, msg.host, len(msg.requests or ()))
            self.send(self.adoption.handle_ready(identity, msg))
        else:
            self.send(self.state.handle_worker_message(identity, msg, raw))

    def _log_malformed(self, reason: str) -> None:
        # At most one line per second: a peer spewing garbage must not flood the log.
        now = self.clock.now()
        if now - self.malformed_logged_s >= 1.0:
            log.warning("dropped malformed worker message: %s (%d dropped so far)", reason, self.malformed_dropped)
            self.malformed_logged_s = now

    def handle_control(self) -> None:
        """One message from the supervisor: a reply to a control call, or its state."""
        assert self.control_sock is not None
        frames = self.control_sock.recv_multipart(copy=True)
        try:
            msg = from_map(unpack_frames(frames), allowed=TO_BROKER, registry=CONTROL_TYPES)
        except ProtocolError as exc:
            log.warning("dropped malformed control message: %s", exc.message)
            return
        self.send(self.lifecycle.handle_control(msg))

    def send_control(self, frames: list[bytes]) -> None:
        """To the supervisor; a call or an ack it cannot take is logged and dropped."""
        if self.control_sock is None:
            return
        try:
            self.control_sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("control message to the supervisor dropped: %s", exc.strerror)

    def models_list(self) -> list[dict[str, Any]]:
        """One entry per model for the `models` reply."""
        return models_summary(make_status(self.state, self.lifecycle)["models"])

    def status(self) -> dict[str, Any]:
        """The `status` reply: routing state, model lifecycles, the supervisor's children, and this broker."""
        status = make_status(self.state, self.lifecycle)
        restarts = self.state.supervisor.restarts("broker") if self.state.supervisor else 0
        status["broker"] = {"pid": os.getpid(), "malformed_dropped": self.malformed_dropped,
                            "frontend": self.cfg.frontend, "backend": self.cfg.backend, "restarts": restarts}
        status["recovery"] = {**self.adoption.view(), "parked": len(self.parking),
                              "parked_total": self.parking.parked_total}
        return status

    # ---- loop --------------------------------------------------------------------

    def request_stop(self) -> None:
        """Start draining (signal-safe: only sets state)."""
        self.stop_requested = True

    def request_handover(self) -> None:
        """Exit at once, leaving running requests to the workers for the next broker (signal-safe)."""
        self.handover_requested = True

    def try_send_client(self, out: Out) -> bool:
        """Send one parked message; False while its client is still unreachable."""
        try:
            self.frontend.send_multipart([out.identity, *_frames(out)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def flush_parked(self) -> None:
        """Parked messages go out once their client is back; one not back in time is gone."""
        for client in self.parking.flush(self.try_send_client):
            why = f"not back within client_return_s={self.cfg.client_return_s:g}s after a broker restart"
            self.send(self.state.client_gone(client, why))

    def run(self) -> None:
        """Poll, handle, tick, heartbeat; until drained after a stop request."""
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        if self.control_sock is not None:
            poller.register(self.control_sock, zmq.POLLIN)
        interval_s = self.cfg.heartbeat_interval_s
        next_beat_s = self.clock.now() + interval_s
        tick_every_s = min(0.05, interval_s)
        next_tick_s = self.clock.now() + tick_every_s
        next_metrics_s = self.clock.now() + METRICS_INTERVAL_S  # the collector connection is up by then
        while not self.handover_requested:
            now = self.clock.now()
            if self.stop_requested and self.drain_deadline_s is None:
                log.info("draining: refusing new requests for up to %.1fs", self.cfg.drain_timeout_s)
                self.state.stop_accepting()
                self.drain_deadline_s = now + self.cfg.drain_timeout_s
            if self.drain_deadline_s is not None and (not self.state.requests or now >= self.drain_deadline_s):
                break
            # Wake for the next beat, tick or request deadline (deadlines are kept to about a millisecond).
            wake_s = min(next_beat_s, next_tick_s, self.state.next_deadline_s())
            ready = dict(poller.poll(poll_ms(wake_s - now)))
            if self.monitor in ready:  # connection events are not urgent: once per wake-up
                self._safely(self.handle_monitor)
            # Drain what is ready, workers first (their chunks unblock clients).
            for _ in range(512):
                progressed = False
                if self.backend.poll(0):
                    self._safely(self.handle_backend)
                    progressed = True
                if self.frontend.poll(0):
                    self._safely(self.handle_frontend)
                    progressed = True
                if self.control_sock is not None and self.control_sock.poll(0):
                    self._safely(self.handle_control)
                    progressed = True
                if not progressed:
                    break
            now = self.clock.now()
            if now >= self.state.next_deadline_s():
                self._safely(lambda: self.send(self.state.expire()))
            if now >= next_tick_s:
                self._safely(lambda: self.send(self.state.tick()))
                self._safely(lambda: self.send(self.adoption.tick()))
                self._safely(self.flush_parked)
                self._safely(lambda: self.send(self.lifecycle.tick()))
                self._log_departures()
                next_tick_s = now + tick_every_s
            self._log_clients_gone()
            if now >= next_beat_s:
                self._safely(lambda: self.send(self.state.heartbeats()))
                next_beat_s = now + interval_s
            if now >= next_metrics_s and self.events.enabled:
                self.events.send("broker", make_broker_event(self.state))
                next_metrics_s = now + METRICS_INTERVAL_S
        if self.handover_requested:
            log.info("handing over: %d requests stay with their workers for the next broker", len(self.state.requests))
            why = "broker restarting: register again with your requests"
        else:
            self._safely(lambda: self.send(self.state.fail_all(UNAVAILABLE, "the broker shut down before this request finished")))
            why = "broker shutting down"
        bye = [Out(Dest.WORKER, w.identity, Disconnect(reason=why)) for w in self.state.workers.values()]
        self._safely(lambda: self.send(bye))
        if self.events.enabled:
            self.events.send("broker", make_broker_event(self.state))  # the final counts

    def _log_departures(self) -> None:
        for worker_id, reason in self.state.departures:
            log.warning("worker %s lost: %s", worker_id, reason)
        self.state.departures.clear()

    def _log_clients_gone(self) -> None:
        for gone in self.state.clients_gone:  # one line per client, however many requests it had open
            log.info("client %s %s: cancelled %d running and dropped %d queued requests",
                     client_name(gone.identity), gone.reason, gone.running, gone.queued)
        self.state.clients_gone.clear()

    def _safely(self, handler: Callable[[], None]) -> None:
        try:  # a bug in one handler must not take the broker down; log it and go on
            handler()
        except zmq.ZMQError:
            raise
        except Exception:
            log.exception("handler failed")

    def close(self) -> None:
        """Close sockets (linger 0) and the context."""
        self.frontend.disable_monitor()
        self.monitor.close(0)
        self.frontend.close(0)
        self.backend.close(0)
        self.events.close()
        if self.control_sock is not None:
            self.control_sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def _source_fd(frame: zmq.Frame) -> int:
    """The descriptor of the connection a message came over (-1 where ZeroMQ cannot say, as for inproc)."""
    try:
        return int(frame.get(zmq.SRCFD))
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return -1


def run_broker(cfg: FleetConfig) -> None:
    """Process entry point (spawned by the supervisor)."""

    def hooks() -> Hooks:
        actor = BrokerActor(cfg)
        return Hooks(start=actor.start, run=actor.run, close=actor.close, request_stop=actor.request_stop,
                     request_handover=actor.request_handover)

    run_process("broker", cfg.log_level, hooks)
