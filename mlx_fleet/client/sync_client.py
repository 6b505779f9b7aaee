"""Client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio), documented in docs/clients.md.

Both have the same calls with the same behaviour and the same public types; the
async ones are awaited. Both speak the wire protocol over one DEALER socket with
a routing id of its own, carry many requests at once, and share their state
logic (:class:`mlx_fleet.client.core.ClientCore`). Every call has a timeout; a
local timeout or an interruption cancels the request in the fleet. Errors raise
:class:`FleetError` carrying the protocol's code. A ``Client`` is not
thread-safe (ZeroMQ sockets are not): use one per thread, or ``AsyncClient``.
"""

from __future__ import annotations

from typing import Any, Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from actors.curve import apply_client
from actors.protocol import (
    DEFAULT_CONNECT, Addressed, ControlReply, Generate, Load, Message, Models, ModelsReply, Status, StatusReply, Unload,
)
from mlx_fleet.client.async_client import AsyncClient, AsyncStream
from mlx_fleet.client.core import (
    DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_RECOVER_TIMEOUT_S, DEFAULT_TIMEOUT_S, GRACE_S, R, Choice, ClientShell,
    Completion, FleetError, Pending, StreamChunk, encode_checked, local_timeout_s, make_generate, new_request_id,
)

__all__ = [
    "DEFAULT_CONNECT", "DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_TIMEOUT_S", "GRACE_S",
    "AsyncClient", "AsyncStream", "Choice", "Client", "Completion", "FleetError", "StreamChunk", "SyncStream",
    "apply_curve_client", "make_generate",
]


def apply_curve_client(sock: zmq.Socket[Any], curve: dict[str, bytes]) -> None:
    """Configure CurveZMQ on a client-side socket: our key pair and the server's public key.

    ``curve`` is ``{"public", "secret", "server"}``; ``actors.curve.load_client_keys``
    builds it from the certificate files that ``mlx-fleet keys`` writes.
    """
    apply_client(sock, curve)


class Client(ClientShell[zmq.SyncSocket]):
    """A blocking client. ``timeout_s`` bounds every call that has no own timeout.

    ``connect_timeout_s`` bounds how long a request waits for a broker to be
    connected at all: past it the request fails with ``unavailable``.
    ``recover_timeout_s`` bounds how long a request open when the connection drops
    waits for the fleet to carry on with it (docs/clients.md).
    """

    def __init__(self, connect: str = DEFAULT_CONNECT, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, curve: dict[str, bytes] | None = None,
                 ctx: zmq.SyncContext | None = None, recover_timeout_s: float = DEFAULT_RECOVER_TIMEOUT_S) -> None:
        super().__init__(ctx or zmq.Context(), ctx is None, connect, timeout_s=timeout_s,
                         connect_timeout_s=connect_timeout_s, curve=curve, recover_timeout_s=recover_timeout_s)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (linger 0); open streams end."""
        if not self.closed:
            self._close_sockets()

    # ---- plumbing ------------------------------------------------------------------

    def _drain_events(self) -> None:
        while self._monitor.poll(0):
            self.core.on_event(recv_monitor_message(self._monitor)["event"])
            for msg in self.core.take_resends():  # a broker is back: what showed no output goes again
                self.sock.send_multipart(encode_checked(msg))

    def _open(self, msg: Addressed, wait_s: float) -> Pending:
        """Register and send a request (a disconnect seen before now concerns only older ones)."""
        frames = encode_checked(msg)
        self._drain_events()
        p = self.core.open(msg.request_id or "", msg.TYPE, wait_s, request=msg if isinstance(msg, Generate) else None)
        try:
            self.sock.send_multipart(frames)
        except BaseException:
            self.core.forget(p.request_id)
            raise
        return p

    def _next(self, p: Pending) -> Message:
        """The next reply of ``p``, waiting for it; a local failure (timeout, lost broker) raises."""
        while True:
            self._drain_events()  # a handshake or a drop may be waiting to be read
            msg, left_s = self.core.next_or_wait(p)
            if msg is not None:
                return msg
            if self.sock in dict(self._poller.poll(max(1, int(left_s * 1000.0)))):
                self.core.on_frames(self.sock.recv_multipart())

    def _call(self, msg: Addressed, reply_type: type[R], timeout_s: float | None) -> R:
        msg.request_id = new_request_id()
        p = self._open(msg, timeout_s or self.timeout_s)
        try:
            while True:
                reply = self.core.reply(p, self._next(p), reply_type)
                if reply is not None:
                    return reply
        finally:
            self._forget(p.request_id)

    # ---- calls ------------------------------------------------------------------------

    def models(self, *, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """The fleet's models."""
        return self._call(Models(), ModelsReply, timeout_s).models

    def status(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The fleet's status map."""
        return self._call(Status(), StatusReply, timeout_s).status

    def load(self, model: str, source: str, *, replicas: int = 1, on_demand: bool = False,
             idle_unload_s: float | None = None, dtype: str | None = None,
             timeout_s: float | None = None) -> dict[str, Any]:
        """Start serving ``model`` in a running fleet; returns the ``control_reply`` map.

        It returns once the supervisor has started the workers; they register with
        the broker as they finish loading (requests for the model queue meanwhile).
        ``dtype`` is its precision (``actors.config.DTYPES``); None takes the fleet's.
        """
        msg = Load(model=model, source=source, replicas=replicas, on_demand=on_demand, idle_unload_s=idle_unload_s,
                   dtype=dtype)
        return self._call(msg, ControlReply, timeout_s).to_map()

    def unload(self, model: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Stop serving ``model`` after its queued and running requests finish; the ``control_reply`` map."""
        return self._call(Unload(model=model), ControlReply, timeout_s).to_map()

    def cancel(self, request_id: str) -> None:
        """Ask the fleet to cancel a request (fire and forget; never blocks).

        The request still ends with its one terminal message, read from its stream.
        With no connected broker a send could wait; the cancel is dropped instead.
        """
        self._cancel_now(request_id)

    def stream(self, prompt: str | None = None, *, model: str, **options: Any) -> "SyncStream":
        """Send a request; iterate the result for chunks. ``stream`` defaults to True.

        Options are the protocol's ``generate`` fields. With ``stream=False`` the
        fleet sends the whole text at the end: the stream yields no chunk and only
        sets ``completion``.
        """
        options.setdefault("stream", True)
        msg = make_generate(model, prompt, **options)
        return SyncStream(self, self._open(msg, local_timeout_s(msg.timeout_s, self.timeout_s)))

    def generate(self, prompt: str | None = None, *, model: str, **options: Any) -> Completion:
        """Generate and wait for the whole completion. ``stream`` defaults to False."""
        options.setdefault("stream", False)
        with self.stream(prompt, model=model, **options) as stream:
            for _ in stream:
                pass
        assert stream.completion is not None
        return stream.completion


class SyncStream:
    """One request in flight: iterate it for :class:`StreamChunk`; ``completion`` is set when it ends.

    Closing it (``close()``, leaving a ``with`` block, breaking out of the loop,
    an exception) before it ends cancels the request in the fleet.
    """

    def __init__(self, client: Client, pending: Pending) -> None:
        self.client = client
        self.request_id = pending.request_id
        self.completion: Completion | None = None
        self._pending = pending
        self._closed = False

    def __enter__(self) -> "SyncStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[StreamChunk]:
        try:
            while self.completion is None and not self._closed:
                item = self.client.core.advance(self._pending, self.client._next(self._pending))
                if isinstance(item, Completion):
                    self.completion = item
                elif item is not None:
                    yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop reading; cancel the request in the fleet unless it has ended."""
        if not self._closed:
            self._closed = True
            self.client._abandon(self._pending)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # the client may be closed, or the interpreter shutting down
            pass
