"""A raw pyzmq client that speaks only what docs/protocol.md documents.

Nothing here imports mlx-fleet: the suite checks the fleet through the same
bytes any client in any language would send.
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


class Wire:
    """A DEALER with its own routing id and a monitor on its connection."""

    def __init__(self, addr: str, *, routing_id: bytes | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.routing_id = routing_id or uuid.uuid4().hex.encode()
        self.sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(addr)
        self.events: list[int] = []
        self.outcomes: dict[str, Outcome] = {}  # by request_id, for messages read while waiting for others
        self.frames_seen: list[list[bytes]] = []

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

    def send_frames(self, frames: list[bytes]) -> None:
        """Any frames at all."""
        self.sock.send_multipart(frames)

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
        self.frames_seen.append(frames)
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


def generate(request_id: str, model: str, **fields: Any) -> dict[str, Any]:
    """A generate map; a field given as None is left out."""
    msg = {"type": "generate", "request_id": request_id, "model": model, "prompt": "Tell me a story", **fields}
    return {k: v for k, v in msg.items() if v is not None}
