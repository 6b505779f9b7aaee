"""Clients that speak the wire protocol by hand, for tests that need every message.

``RawClient`` is a bare DEALER that sends protocol maps (or any frames at all) and
reads each reply; ``Tracker`` files what one RawClient got by request.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import zmq

from actors.protocol import PROTOCOL_TAG


class RawClient:
    """A bare DEALER speaking the wire protocol, for tests that need every message."""

    def __init__(self, addr: str, *, rcvhwm: int | None = None, rcvbuf_bytes: int | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if rcvhwm is not None:
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if rcvbuf_bytes is not None:
            self.sock.setsockopt(zmq.RCVBUF, rcvbuf_bytes)
        self.sock.connect(addr)

    def send(self, payload: dict[str, Any]) -> None:
        """Send one protocol map."""
        self.sock.send_multipart([PROTOCOL_TAG, msgpack.packb(payload, use_bin_type=True)])

    def send_frames(self, frames: list[bytes]) -> None:
        """Send arbitrary frames (hostile-input tests)."""
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float) -> dict[str, Any] | None:
        """The next decoded map, or None after ``timeout_s``."""
        if not self.sock.poll(timeout_s * 1000.0):
            return None
        frames = self.sock.recv_multipart()
        return msgpack.unpackb(frames[-1], raw=False)

    def call(self, payload: dict[str, Any], *, timeout_s: float = 10.0) -> dict[str, Any]:
        """Send and wait for the reply with the same request_id (others are dropped)."""
        self.send(payload)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg is not None and msg.get("request_id") == payload.get("request_id"):
                return msg
        raise AssertionError(f"no reply to {payload.get('type')} {payload.get('request_id')} within {timeout_s}s")

    def close(self) -> None:
        """Close with linger 0."""
        self.sock.close(0)
        self.ctx.term()


class Tracker:
    """Every message a RawClient got, per request: chunk count and terminal replies."""

    def __init__(self, raw: RawClient, request_ids: list[str]) -> None:
        self.raw = raw
        self.chunks: dict[str, int] = {rid: 0 for rid in request_ids}
        self.terminals: dict[str, list[dict[str, Any]]] = {rid: [] for rid in request_ids}
        self.other: list[dict[str, Any]] = []

    def add(self, request_id: str) -> None:
        """Track one more request."""
        self.chunks[request_id] = 0
        self.terminals[request_id] = []

    def pump(self, timeout_s: float = 0.05) -> None:
        """Read whatever arrives within ``timeout_s`` (at least one poll)."""
        msg = self.raw.recv(timeout_s)
        while msg is not None:
            rid = msg.get("request_id")
            if rid in self.chunks and msg["type"] == "chunk":
                self.chunks[rid] += 1
            elif rid in self.terminals and msg["type"] in ("done", "error"):
                self.terminals[rid].append(msg)
            else:
                self.other.append(msg)
            msg = self.raw.recv(0)

    def open(self) -> list[str]:
        """Requests with no terminal reply yet."""
        return [rid for rid, t in self.terminals.items() if not t]

    def settle(self, *, timeout_s: float = 10.0) -> None:
        """Round-trip a status so anything the broker sent before it has been read."""
        token = f"sync-{time.monotonic_ns()}"
        self.raw.send({"type": "status", "request_id": token})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pump(0.05)
            if any(m.get("request_id") == token for m in self.other):
                return
        raise AssertionError("no status reply while settling")
