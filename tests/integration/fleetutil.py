"""Helpers to run a real fleet (broker + spawned workers) inside a test."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import tempfile
import time
from typing import Any, Iterator

import msgpack
import zmq

from actors.config import BatchingConfig, FleetConfig, ModelSpec
from actors.protocol import PROTOCOL_TAG
from fleet.embedded import BackgroundFleet


def free_tcp_port() -> int:
    """A currently free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_ipc_dir() -> str:
    """A short /tmp folder for ipc:// sockets (paths are limited to ~100 bytes)."""
    return tempfile.mkdtemp(prefix="mlxf-", dir="/tmp")


# Kept under the name the tests use.
RunningFleet = BackgroundFleet


def make_config(
    *,
    transport: str = "ipc",
    models: tuple[tuple[str, str, int], ...] = (("demo", "demo", 1),),
    batching: BatchingConfig | None = None,
    gateway: bool = False,
    **overrides: Any,
) -> tuple[FleetConfig, str | None]:
    """A test FleetConfig on fresh ipc paths or tcp ports; metrics off unless asked.

    The HTTP gateway is off unless ``gateway=True``, which puts it on a free loopback port.
    """
    ipc_dir = None
    if transport == "ipc":
        ipc_dir = short_ipc_dir()
        frontend, backend = f"ipc://{ipc_dir}/front", f"ipc://{ipc_dir}/back"
    else:
        frontend, backend = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    b = batching or BatchingConfig()
    specs = tuple(ModelSpec(n, s, r, b) for n, s, r in models)
    base = FleetConfig(frontend=frontend, backend=backend, metrics_export=False, ready_timeout_s=120.0,
                       drain_timeout_s=10.0, models=specs, batching=b,
                       http_port=free_tcp_port() if gateway else 0)
    return dataclasses.replace(base, **overrides), ipc_dir


def start_fleet(**kwargs: Any) -> RunningFleet:
    """make_config + start."""
    cfg, ipc_dir = make_config(**kwargs)
    return RunningFleet(cfg, ipc_dir).start()


@contextlib.contextmanager
def running_fleet(**kwargs: Any) -> Iterator[RunningFleet]:
    """``start_fleet`` as a context manager that always stops the fleet."""
    fleet = start_fleet(**kwargs)
    try:
        yield fleet
    finally:
        fleet.stop()


def fleet_status(addr: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """One ``status`` call on a fresh client."""
    from broker.client import Client

    with Client(addr, timeout_s=timeout_s) as client:
        return client.status()


def worker_row(status: dict[str, Any], worker_id: str) -> dict[str, Any] | None:
    """The status entry of one worker, wherever its model is."""
    for model in status["models"].values():
        for row in model["workers"]:
            if row["worker_id"] == worker_id:
                return row
    return None


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc/<pid>/status (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


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


def greedy_reference(model: Any, tokenizer: Any, prompt: Any, max_tokens: int) -> tuple[list[int], str]:
    """In-process ``mlx_lm.stream_generate``, greedy: the token ids (EOS left out) and text."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    ids, text = [], []
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
        text.append(r.text)
        if r.finish_reason == "stop":
            break
        ids.append(r.token)
    return ids, "".join(text)
