"""Client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak the wire protocol over one DEALER socket. Every call has a timeout;
a local timeout or an interruption cancels the request in the fleet. Errors
raise :class:`FleetError` carrying the protocol's code. A ``Client`` is not
thread-safe (ZeroMQ sockets are not): use one per thread, or ``AsyncClient``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from actors.protocol import (
    BAD_REQUEST, DEFAULT_LIMITS, TIMEOUT, UNAVAILABLE, Cancel, Generate, Load, Message, Models, ProtocolError, Status,
    Unload,
    decode, encode,
)
from actors.curve import apply_client
from actors.sockets import make_socket

DEFAULT_CONNECT = "tcp://127.0.0.1:5555"
# Extra local wait past a request's own timeout_s, so the fleet's timeout error arrives first.
GRACE_S = 2.0


class FleetError(Exception):
    """A request or call failed; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass
class StreamChunk:
    """New text (and its token ids) of a streaming request."""

    text: str
    token_ids: list[int]


@dataclass
class Completion:
    """A finished request."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def make_generate(model: str, prompt: str | None, *, stream: bool, **options: Any) -> Generate:
    """A ``generate`` message with a fresh request id; options as in the protocol."""
    rid = options.pop("request_id", None) or uuid.uuid4().hex
    return Generate(request_id=rid, model=model, prompt=prompt, stream=stream, **options)


class _Accumulator:
    """Builds the Completion from chunks and the terminal message."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.parts: list[str] = []
        self.ids: list[int] = []

    def finish(self, data: dict[str, Any]) -> Completion:
        if data.get("type") == "error":
            raise FleetError(str(data.get("code")), str(data.get("message")), self.request_id)
        text = data.get("text")
        return Completion(
            self.request_id,
            "".join(self.parts) if text is None else text,
            self.ids if data.get("token_ids") is None else list(data["token_ids"]),
            data.get("finish_reason", ""), dict(data.get("usage", {})), dict(data.get("timings", {})),
        )


def _decode_reply(frames: list[bytes]) -> dict[str, Any]:
    try:
        msg = decode(frames)
    except ProtocolError as exc:
        raise FleetError("bad_reply", f"undecodable reply from broker: {exc.message}") from None
    data = msg.to_map()
    return data


def encode_checked(msg: Message) -> list[bytes]:
    """Frames for ``msg``; a payload the broker would drop unread raises ``bad_request`` here."""
    frames = encode(msg)
    if len(frames[1]) > DEFAULT_LIMITS.max_frame_bytes:
        raise FleetError(BAD_REQUEST, f"request of {len(frames[1])} bytes exceeds max_frame_bytes="
                         f"{DEFAULT_LIMITS.max_frame_bytes}", getattr(msg, "request_id", None))
    return frames


def _lost(addr: str, request_id: str | None = None) -> dict[str, Any]:
    """The error a request gets when the connection to the broker drops under it."""
    return {"type": "error", "code": UNAVAILABLE, "request_id": request_id,
            "message": f"lost the connection to the broker at {addr} (it may have restarted); the request's outcome is unknown"}


def _local_timeout(msg_timeout_s: float | None, default_s: float) -> float:
    return msg_timeout_s + GRACE_S if msg_timeout_s is not None else default_s


class Client:
    """A blocking client. ``timeout_s`` bounds every call that has no own timeout."""

    def __init__(self, connect: str = DEFAULT_CONNECT, *, timeout_s: float = 120.0, ctx: zmq.Context | None = None,
                 curve: dict[str, bytes] | None = None) -> None:
        self.connect_addr = connect
        self.timeout_s = timeout_s
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER)
        if curve:
            apply_curve_client(self.sock, curve)
        self.sock.connect(connect)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (linger 0)."""
        self.sock.disable_monitor()
        self._monitor.close(0)
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def _send(self, msg: Message) -> None:
        self.sock.send_multipart(encode_checked(msg))

    def _forget_old_disconnects(self) -> None:
        # A disconnect seen before this request began is about an earlier one.
        while self._monitor.poll(0):
            self._monitor.recv_multipart()

    def _recv(self, deadline_s: float, what: str) -> dict[str, Any]:
        while True:
            left_ms = (deadline_s - time.monotonic()) * 1000.0
            if left_ms <= 0:
                raise FleetError(TIMEOUT, f"no answer from {self.connect_addr} within the timeout ({what})")
            events = dict(self._poller.poll(left_ms))
            if self._monitor in events:
                event = recv_monitor_message(self._monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise FleetError(UNAVAILABLE, f"the broker at {self.connect_addr} refused our CurveZMQ key")
                raise FleetError(UNAVAILABLE, _lost(self.connect_addr)["message"])
            if self.sock in events:
                return _decode_reply(self.sock.recv_multipart())

    def _call(self, msg: Message, reply_type: str, timeout_s: float | None) -> dict[str, Any]:
        rid = uuid.uuid4().hex
        msg.request_id = rid  # type: ignore[attr-defined]
        self._forget_old_disconnects()
        self._send(msg)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            data = self._recv(deadline, msg.TYPE)
            if data.get("request_id") != rid:
                continue  # a late reply to an earlier, abandoned request
            if data["type"] == "error":
                raise FleetError(data["code"], data["message"], rid)
            if data["type"] == reply_type:
                return data

    def models(self, *, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """The fleet's models."""
        return self._call(Models(), "models_reply", timeout_s)["models"]

    def status(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The fleet's status map."""
        return self._call(Status(), "status_reply", timeout_s)["status"]

    def load(self, model: str, source: str, *, replicas: int = 1, on_demand: bool = False,
             idle_unload_s: float | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Start serving ``model`` in a running fleet; returns the ``control_reply`` map.

        It returns once the supervisor has started the workers; they register with
        the broker as they finish loading (requests for the model queue meanwhile).
        """
        msg = Load(model=model, source=source, replicas=replicas, on_demand=on_demand, idle_unload_s=idle_unload_s)
        return self._call(msg, "control_reply", timeout_s)

    def unload(self, model: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Stop serving ``model`` after its queued and running requests finish; the ``control_reply`` map."""
        return self._call(Unload(model=model), "control_reply", timeout_s)

    def cancel(self, request_id: str) -> None:
        """Ask the fleet to cancel a request (fire and forget; never blocks).

        With no connected broker (gone, or a refused CurveZMQ handshake) a DEALER send
        would wait forever; then there is nothing to cancel, so the message is dropped.
        """
        try:
            self.sock.send_multipart(encode_checked(Cancel(request_id)), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def stream(self, prompt: str | None = None, *, model: str, **options: Any) -> "SyncStream":
        """Start a streaming request; iterate the result for chunks."""
        msg = make_generate(model, prompt, stream=True, **options)
        self._forget_old_disconnects()
        self._send(msg)
        return SyncStream(self, msg.request_id, time.monotonic() + _local_timeout(msg.timeout_s, self.timeout_s))

    def generate(self, prompt: str | None = None, *, model: str, **options: Any) -> Completion:
        """Generate and wait for the whole completion."""
        msg = make_generate(model, prompt, stream=False, **options)
        self._forget_old_disconnects()
        self._send(msg)
        s = SyncStream(self, msg.request_id, time.monotonic() + _local_timeout(msg.timeout_s, self.timeout_s))
        for _ in s:
            pass
        assert s.completion is not None
        return s.completion


class SyncStream:
    """Iterator of :class:`StreamChunk`; ``completion`` is set when it ends."""

    def __init__(self, client: Client, request_id: str, deadline_s: float) -> None:
        self.client = client
        self.request_id = request_id
        self.deadline_s = deadline_s
        self.acc = _Accumulator(request_id)
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[StreamChunk]:
        try:
            while self.completion is None:
                data = self.client._recv(self.deadline_s, "generate")
                if data.get("request_id") != self.request_id:
                    continue
                if data["type"] == "chunk":
                    self.acc.parts.append(data["text"])
                    self.acc.ids.extend(data["token_ids"])
                    yield StreamChunk(data["text"], data["token_ids"])
                elif data["type"] in ("done", "error"):
                    self.completion = self.acc.finish(data)
        except (FleetError, KeyboardInterrupt, GeneratorExit) as exc:
            if self.completion is None and not (isinstance(exc, FleetError) and exc.request_id == self.request_id):
                self.client.cancel(self.request_id)
            raise


def apply_curve_client(sock: zmq.Socket, curve: dict[str, bytes]) -> None:
    """Configure CurveZMQ on a client-side socket: our key pair and the server's public key.

    ``curve`` is ``{"public", "secret", "server"}``; ``actors.curve.load_client_keys``
    builds it from the certificate files that ``mlx-fleet keys`` writes.
    """
    apply_client(sock, curve)


class AsyncClient:
    """An asyncio client: many concurrent requests over one socket."""

    def __init__(self, connect: str = DEFAULT_CONNECT, *, timeout_s: float = 120.0,
                 curve: dict[str, bytes] | None = None, ctx: zmq.asyncio.Context | None = None) -> None:
        self.connect_addr = connect
        self.timeout_s = timeout_s
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.asyncio.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER)  # type: ignore[arg-type]
        if curve:
            apply_curve_client(self.sock, curve)
        self.sock.connect(connect)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reader and the connection watcher, and close the sockets."""
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self.sock.disable_monitor()
        self._monitor.close(0)
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def _ensure_reader(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read())
        if self._watcher is None or self._watcher.done():
            # Disconnects from before anything was watching concern no open request.
            sync_monitor = zmq.Socket.shadow(self._monitor.underlying)
            while sync_monitor.poll(0):
                sync_monitor.recv_multipart()
            self._watcher = loop.create_task(self._watch())

    async def _watch(self) -> None:
        """When the connection drops, every open request ends with ``unavailable`` (never a hang)."""
        while True:
            await self._monitor.recv_multipart()
            for rid, queue in list(self._queues.items()):
                queue.put_nowait(_lost(self.connect_addr, rid))

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                data = _decode_reply(frames)
            except FleetError:
                continue
            queue = self._queues.get(str(data.get("request_id")))
            if queue is not None:
                queue.put_nowait(data)

    async def _open(self, msg: Message) -> asyncio.Queue[dict[str, Any]]:
        self._ensure_reader()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._queues[msg.request_id] = queue  # type: ignore[attr-defined]
        try:
            await self.sock.send_multipart(encode_checked(msg))
        except BaseException:
            self._queues.pop(msg.request_id, None)  # type: ignore[attr-defined]
            raise
        return queue

    async def _call(self, msg: Message, reply_type: str, timeout_s: float | None) -> dict[str, Any]:
        msg.request_id = uuid.uuid4().hex  # type: ignore[attr-defined]
        queue = await self._open(msg)
        try:
            data = await asyncio.wait_for(queue.get(), timeout_s or self.timeout_s)
        except asyncio.TimeoutError:
            raise FleetError(TIMEOUT, f"no answer from {self.connect_addr} within the timeout ({msg.TYPE})") from None
        finally:
            self._queues.pop(msg.request_id, None)  # type: ignore[attr-defined]
        if data["type"] == "error":
            raise FleetError(data["code"], data["message"])
        return data

    async def models(self, *, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """The fleet's models."""
        return (await self._call(Models(), "models_reply", timeout_s))["models"]

    async def status(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The fleet's status map."""
        return (await self._call(Status(), "status_reply", timeout_s))["status"]

    async def load(self, model: str, source: str, *, replicas: int = 1, on_demand: bool = False,
                   idle_unload_s: float | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """As :meth:`Client.load`."""
        msg = Load(model=model, source=source, replicas=replicas, on_demand=on_demand, idle_unload_s=idle_unload_s)
        return await self._call(msg, "control_reply", timeout_s)

    async def unload(self, model: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """As :meth:`Client.unload`."""
        return await self._call(Unload(model=model), "control_reply", timeout_s)

    async def cancel(self, request_id: str) -> None:
        """Ask the fleet to cancel a request (never waits for a broker to connect; see Client.cancel)."""
        try:
            await self.sock.send_multipart(encode_checked(Cancel(request_id)), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    async def stream(self, prompt: str | None = None, *, model: str, **options: Any) -> AsyncIterator[StreamChunk | Completion]:
        """Yield chunks, then the final :class:`Completion` as the last item."""
        stream = options.pop("_stream", True)
        msg = make_generate(model, prompt, stream=stream, **options)
        queue = await self._open(msg)
        acc = _Accumulator(msg.request_id)
        deadline = time.monotonic() + _local_timeout(msg.timeout_s, self.timeout_s)
        finished = False
        try:
            while True:
                try:
                    data = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise FleetError(TIMEOUT, f"no answer from {self.connect_addr} within the timeout (generate)", msg.request_id) from None
                if data["type"] == "chunk":
                    acc.parts.append(data["text"])
                    acc.ids.extend(data["token_ids"])
                    yield StreamChunk(data["text"], data["token_ids"])
                elif data["type"] in ("done", "error"):
                    finished = True
                    yield acc.finish(data)
                    return
        finally:
            self._queues.pop(msg.request_id, None)
            if not finished:
                try:
                    await self.cancel(msg.request_id)
                except Exception:
                    pass

    async def generate(self, prompt: str | None = None, *, model: str, **options: Any) -> Completion:
        """Generate and return the whole completion."""
        result: Completion | None = None
        async for item in self.stream(prompt, model=model, _stream=False, **options):
            if isinstance(item, Completion):
                result = item
        assert result is not None
        return result
