"""A client that speaks the wire protocol by hand, for tests that need every message.

It imports only pyzmq and msgpack, nothing of mlx-fleet: the conformance suite checks
a fleet through the same bytes a client in any language would send (docs/protocol.md),
and the integration tests use it where they must see, or break, the wire itself.

``RawClient`` is a DEALER that sends protocol maps (or any frames at all), checks
that each reply is two frames (the tag and one map) and files it under its
request; ``Tracker`` counts what one RawClient got, per request.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

TAG = b"MLXF1"
MAX_FRAME_BYTES = 4 * 1024 * 1024  # docs/protocol.md, Limits
TERMINAL = ("done", "error")


def pack(payload: Any) -> bytes:
    """msgpack with strings as str, as the protocol wants."""
    return msgpack.packb(payload, use_bin_type=True)


def rid() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def generate(request_id: str, model: str, **fields: Any) -> dict[str, Any]:
    """A generate map; a field given as None is left out."""
    msg = {"type": "generate", "request_id": request_id, "model": model, "prompt": "Tell me a story", **fields}
    return {k: v for k, v in msg.items() if v is not None}


@dataclass
class Outcome:
    """Everything one request got: its chunks and its terminal messages (one, if the fleet conforms)."""

    chunks: list[dict[str, Any]] = field(default_factory=list)
    terminals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def end(self) -> dict[str, Any]:
        """The one terminal message."""
        assert len(self.terminals) == 1, self.terminals
        return self.terminals[0]

    @property
    def text(self) -> str:
        """The chunks' text, joined."""
        return "".join(c["text"] for c in self.chunks)


class RawClient:
    """A DEALER with its own routing id and a monitor on its connection.

    ``rcvhwm`` and ``rcvbuf_bytes`` shrink what it buffers, for a client that stops reading.
    """

    def __init__(self, addr: str, *, routing_id: bytes | None = None, rcvhwm: int | None = None,
                 rcvbuf_bytes: int | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.routing_id = routing_id or uuid.uuid4().hex.encode()
        self.sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        if rcvhwm is not None:
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if rcvbuf_bytes is not None:
            self.sock.setsockopt(zmq.RCVBUF, rcvbuf_bytes)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(addr)
        self.events: list[int] = []
        self.outcomes: dict[str, Outcome] = {}  # by request_id, for messages read while waiting for others
        self.last_frames: list[bytes] = []

    def close(self) -> None:
        """Close everything with linger 0."""
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()

    # ---- sending ---------------------------------------------------------------------

    def send(self, payload: dict[str, Any]) -> None:
        """One protocol map."""
        self.sock.send_multipart([TAG, pack(payload)])

    def send_frames(self, frames: list[bytes], flags: int = 0) -> None:
        """Any frames at all (``flags``: pyzmq's, such as ``zmq.NOBLOCK``)."""
        self.sock.send_multipart(frames, flags=flags)

    # ---- receiving -------------------------------------------------------------------

    def read_events(self) -> list[int]:
        """Monitor events that arrived so far (also kept in ``events``)."""
        got = []
        while self.monitor.poll(0):
            got.append(recv_monitor_message(self.monitor)["event"])
        self.events += got
        return got

    def wait_event(self, event: int, timeout_s: float) -> bool:
        """True once ``event`` is seen within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.monitor.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                if event in self.read_events():
                    return True
        return False

    def recv(self, timeout_s: float) -> dict[str, Any] | None:
        """The next message's map, or None after ``timeout_s``; also filed under its request."""
        if not self.sock.poll(max(0, int(timeout_s * 1000))):
            return None
        frames = self.sock.recv_multipart()
        self.last_frames = frames
        assert len(frames) == 2 and frames[0] == TAG, frames[:1]
        msg = msgpack.unpackb(frames[1], raw=False)
        assert isinstance(msg, dict) and isinstance(msg.get("type"), str), msg
        key = msg.get("request_id")
        if isinstance(key, str):
            outcome = self.outcomes.setdefault(key, Outcome())
            (outcome.terminals if msg["type"] in TERMINAL else outcome.chunks).append(msg)
        return msg

    def reply_to(self, request_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The next message naming ``request_id``."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise AssertionError(f"no message for {request_id!r} within {timeout_s:g}s")
            if msg.get("request_id") == request_id:
                return msg

    def call(self, payload: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        """Send and return the first message naming the payload's request_id."""
        self.send(payload)
        return self.reply_to(payload["request_id"], timeout_s)

    def finish(self, request_id: str, timeout_s: float = 120.0) -> Outcome:
        """Read until ``request_id`` has its terminal message; then make sure nothing follows it."""
        deadline = time.monotonic() + timeout_s
        while not self.outcomes.get(request_id, Outcome()).terminals:
            if self.recv(max(0.0, deadline - time.monotonic())) is None:
                raise AssertionError(f"no terminal message for {request_id!r} within {timeout_s:g}s")
        return self.outcomes[request_id]

    def settle(self, timeout_s: float = 30.0) -> None:
        """Round-trip a status: everything the broker sent before it has been read."""
        self.call({"type": "status", "request_id": "settle-" + rid()}, timeout_s)

    def first_model(self) -> dict[str, Any]:
        """The first served model with a ready worker, from ``models``."""
        models = self.call({"type": "models", "request_id": rid()})["models"]
        ready = [m for m in models if m.get("workers_ready")]
        assert ready, f"no model with a ready worker: {models}"
        return ready[0]


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
