"""A raw pyzmq client that follows docs/protocol.md's recipe for a broker restart.

Nothing here imports mlx-fleet: it builds on :class:`tests.integration.clients.RawClient`.
It carries many requests on one DEALER with its own routing id, watches the socket
monitor, and when the connection drops:

1. keeps every open request; one that has shown no output is sent again, unchanged
   but for ``resend: true``, once the monitor reports a new handshake;
2. drops, by ``text_offset`` and ``token_offset``, the output of a chunk it already has;
3. ignores anything for a request it has ended;
4. gives up on a request that had shown output when nothing new came for it within
   ``recover_s`` of the drop (its outcome is unknown), and cancels it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from tests.integration.clients import RawClient


@dataclass
class Request:
    """One request and everything it got, after the recipe's filtering."""

    payload: dict[str, Any]
    text: list[str] = field(default_factory=list)
    chars: int = 0
    token_ids: list[int] = field(default_factory=list)
    end: dict[str, Any] | None = None  # its one terminal message (or a local failure)
    lost_at_s: float | None = None  # the connection dropped while it was open
    resend_due: bool = False
    resent: int = 0
    repeats_dropped: int = 0  # chunks (or parts of them) already had
    late_ignored: int = 0  # messages after its end

    @property
    def started(self) -> bool:
        """It has shown output."""
        return bool(self.chars or self.token_ids)


class RecoveringClient(RawClient):
    """A :class:`RawClient` (its own routing id, a monitor) that carries its requests through a broker restart."""

    def __init__(self, addr: str, *, recover_s: float = 15.0) -> None:
        super().__init__(addr)
        self.recover_s = recover_s
        self.requests: dict[str, Request] = {}
        self.drops = 0
        self.connected = False

    def generate(self, request_id: str, **fields: Any) -> Request:
        """Send a generate and track it."""
        req = self.requests[request_id] = Request({"type": "generate", "request_id": request_id, **fields})
        self.send(req.payload)
        return req

    def open(self) -> list[Request]:
        """Requests without an end yet."""
        return [r for r in self.requests.values() if r.end is None]

    def pump(self, timeout_s: float) -> None:
        """Handle what comes within ``timeout_s``: connection events first, then replies."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.poll(timeout_s * 1000.0)
        for event in self.read_events():
            self._on_event(event)
        while (msg := self.recv(0)) is not None:
            self._on_reply(msg)
        now = time.monotonic()
        for req in self.open():
            if req.lost_at_s is not None and now - req.lost_at_s >= self.recover_s:
                req.end = {"type": "error", "code": "unavailable", "message": "not resumed after a broker restart"}
                self.send({"type": "cancel", "request_id": req.payload["request_id"]})

    def run_until_done(self, timeout_s: float) -> None:
        """Pump until every request has ended, or fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.open():
            if time.monotonic() >= deadline:
                raise AssertionError(f"{len(self.open())} requests still open after {timeout_s}s")
            self.pump(0.05)

    def _on_event(self, event: int) -> None:
        if event == zmq.EVENT_DISCONNECTED:
            self.drops += 1
            self.connected = False
            for req in self.open():
                req.lost_at_s = req.lost_at_s or time.monotonic()
                req.resend_due = not req.started
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected = True
            for req in self.open():
                if req.resend_due:
                    req.resend_due, req.lost_at_s = False, None
                    req.resent += 1
                    self.send({**req.payload, "resend": True})

    def _on_reply(self, msg: dict[str, Any]) -> None:
        req = self.requests.get(msg.get("request_id"))
        if req is None:
            return
        if req.end is not None:
            req.late_ignored += 1
            return
        if self.connected:
            req.lost_at_s = None  # a broker carries on with it
        if msg["type"] == "chunk":
            self._on_chunk(req, msg)
        elif msg["type"] in ("done", "error"):
            req.end = msg

    def _on_chunk(self, req: Request, msg: dict[str, Any]) -> None:
        text_at, ids_at = msg.get("text_offset", req.chars), msg.get("token_offset", len(req.token_ids))
        if text_at > req.chars or ids_at > len(req.token_ids):
            req.end = {"type": "error", "code": "unavailable", "message": "a gap in the stream"}
            return
        text, ids = msg["text"][req.chars - text_at:], msg["token_ids"][len(req.token_ids) - ids_at:]
        if len(text) < len(msg["text"]) or len(ids) < len(msg["token_ids"]):
            req.repeats_dropped += 1
        req.text.append(text)
        req.chars += len(text)
        req.token_ids += ids
