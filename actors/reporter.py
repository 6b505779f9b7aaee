"""The supervisor's line to the broker: ``fleet_info`` out, ``fleet_info_ack`` back.

The supervisor connects a DEALER to the broker's worker endpoint (a trusted side:
over tcp it sits behind the same CurveZMQ keys as workers) and reports its
children: pids, liveness, restarts. The broker folds that into `status`, and
answers with the workers it declared dead for silence, so the supervisor can kill
a hung process and restart it. Every send is non-blocking: while the broker is
down, reports are dropped (a newer one always follows).
"""

from __future__ import annotations

import logging
import os

import zmq

from actors.curve import CurveKeys, apply_client
from actors.protocol import FleetInfo, FleetInfoAck, ProtocolError, decode, encode
from actors.sockets import make_socket

log = logging.getLogger("mlx_fleet.supervisor")

# Reports are state, not events: a few queued ones are plenty while the broker restarts.
REPORT_HWM = 4


class FleetReporter:
    """Sends ``fleet_info`` and collects ``fleet_info_ack`` without ever blocking."""

    def __init__(self, backend: str, *, ctx: zmq.Context | None = None, curve: CurveKeys | None = None) -> None:
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        identity = f"supervisor:{os.getpid()}".encode()
        self.sock = make_socket(self.ctx, zmq.DEALER, hwm=REPORT_HWM, identity=identity)
        if curve:  # the worker endpoint requires CurveZMQ: the supervisor's local key (actors/curve.py)
            apply_client(self.sock, curve)
        self.sock.connect(backend)
        self.sent = 0
        self.dropped = 0

    def send(self, children: list[dict]) -> None:
        """Report the children now (dropped if the broker is not taking messages)."""
        try:
            self.sock.send_multipart(encode(FleetInfo(children=children, supervisor_pid=os.getpid())), flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1

    def acks(self) -> list[FleetInfoAck]:
        """Every ack that has arrived, oldest first (non-blocking)."""
        out: list[FleetInfoAck] = []
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            try:
                msg = decode(frames, allowed=frozenset({"fleet_info_ack", "disconnect", "heartbeat"}))
            except ProtocolError as exc:
                log.warning("dropped malformed broker reply to fleet_info: %s", exc.message)
                continue
            if isinstance(msg, FleetInfoAck):
                out.append(msg)
        return out

    def close(self) -> None:
        """Close the socket (linger 0)."""
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()
