"""What both client libraries share: public types, the state of a client, its socket.

:class:`ClientCore` is the state of one client object, without sockets: its open
requests (each with the replies not yet read), whether a broker is connected,
and what each reply or connection event means. It takes a clock, so its unit
tests drive time without sleeping. :class:`ClientShell` holds the socket side
both clients share. ``Client`` and ``AsyncClient`` only move frames and monitor
events into the core and wait on it, so both behave the same.

When the connection to the broker drops (docs/protocol.md, Broker recovery), an open
``generate`` that had shown no output is sent again, ``resend: true``, as soon as a
broker is connected; one whose stream had started waits up to ``recover_timeout_s``
for its worker to resume it through the new broker. Chunks say where they start, so
output sent again is not yielded twice.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

import zmq

from actors.clock import Clock, MonotonicClock
from actors.curve import apply_client
from actors.protocol import (
    BAD_REQUEST, DEFAULT_LIMITS, DUPLICATE_REQUEST, TIMEOUT, UNAVAILABLE,
    Addressed, Cancel, Chunk, Done, Error, Generate, Message, ProtocolError, decode, encode,
)
from actors.sockets import SocketT, make_socket
from mlx_fleet.client.results import Choice, Completion, Output, StreamChunk, make_completion

__all__ = [
    "BAD_REPLY", "DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_RECOVER_TIMEOUT_S", "DEFAULT_TIMEOUT_S", "GRACE_S",
    "MONITOR_EVENTS", "R", "Choice", "ClientCore", "ClientShell", "Completion", "FleetError", "Output", "Pending",
    "StreamChunk", "encode_checked", "local_timeout_s", "make_generate", "make_routing_id", "new_request_id",
]

DEFAULT_TIMEOUT_S = 120.0  # a call or request with no timeout_s of its own
DEFAULT_CONNECT_TIMEOUT_S = 5.0  # how long a request waits for a broker to be connected at all
DEFAULT_RECOVER_TIMEOUT_S = 15.0  # after a drop: how long a request waits for the fleet to carry on (> workers' grace)
GRACE_S = 2.0  # extra local wait past a request's own timeout_s, so the fleet's `timeout` error arrives first
BAD_REPLY = "bad_reply"  # a local code: the broker's answer could not be decoded
R = TypeVar("R", bound=Message)
# The connection events the clients watch on their socket's monitor.
MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH


class FleetError(Exception):
    """A request or call failed; ``code`` is the protocol error code (or ``bad_reply``)."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def new_request_id() -> str:
    """A fresh, random request id."""
    return uuid.uuid4().hex


def make_generate(model: str, prompt: str | None, **options: Any) -> Generate:
    """A ``generate`` message with a fresh request id; options are the protocol's fields.

    The decoding controls go as they are (``n``, ``logprobs``, ``top_logprobs``, ``grammar``,
    the penalties, ``min_p``); ``logit_bias`` may use int token ids as keys.
    """
    rid = options.pop("request_id", None) or new_request_id()
    bias = options.get("logit_bias")
    if isinstance(bias, dict):
        options["logit_bias"] = {str(k): v for k, v in bias.items()}
    return Generate(request_id=rid, model=model, prompt=prompt, **options)


def make_routing_id() -> bytes:
    """A random ZeroMQ routing id for one client object (ASCII; never starts with a zero byte)."""
    return uuid.uuid4().hex.encode()


def encode_checked(msg: Message) -> list[bytes]:
    """Frames for ``msg``; a payload the broker would not read raises ``bad_request`` here."""
    frames = encode(msg)
    if len(frames[1]) > DEFAULT_LIMITS.max_frame_bytes:
        rid = msg.request_id if isinstance(msg, Addressed) else None
        raise FleetError(BAD_REQUEST, f"request of {len(frames[1])} bytes exceeds max_frame_bytes="
                         f"{DEFAULT_LIMITS.max_frame_bytes}", rid)
    return frames


def local_timeout_s(msg_timeout_s: float | None, default_s: float) -> float:
    """How long a client waits for a request that asked the fleet for ``msg_timeout_s``."""
    return msg_timeout_s + GRACE_S if msg_timeout_s is not None else default_s


@dataclass
class Pending:
    """One open request: its unread replies, its deadline, and the output so far."""

    request_id: str
    what: str  # the message type, for error messages
    sent_s: float
    deadline_s: float
    notify: Callable[[], None] | None = None  # wakes a waiting coroutine (AsyncClient)
    inbox: deque[Message | FleetError] = field(default_factory=deque)
    outputs: dict[int, Output] = field(default_factory=dict)  # by completion index
    ended: bool = False  # the fleet sent its terminal message
    request: Generate | None = None  # a generate, sent again if the connection drops before any output
    lost_at_s: float | None = None  # the connection dropped while this waited, and the fleet has not carried on yet
    resend_due: bool = False  # to send again once a broker is connected

    @property
    def shown(self) -> bool:
        """Whether any output of this request came."""
        return any(o.shown for o in self.outputs.values())

    def output(self, index: int) -> Output:
        """Completion ``index``'s output so far."""
        out = self.outputs.get(index)
        if out is None:
            out = self.outputs[index] = Output()
        return out

    def put(self, item: Message | FleetError) -> None:
        """Queue a reply (or a local failure) for the reader of this request."""
        self.inbox.append(item)
        if self.notify is not None:
            self.notify()


class ClientCore:
    """Open requests and the link to the broker of one client object; no sockets."""

    def __init__(self, addr: str, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 recover_timeout_s: float = DEFAULT_RECOVER_TIMEOUT_S, clock: Clock | None = None) -> None:
        self.addr = addr
        self.connect_timeout_s = connect_timeout_s
        self.recover_timeout_s = recover_timeout_s
        self.clock = clock or MonotonicClock()
        self.connected = False  # a broker completed the ZeroMQ handshake and has not gone since
        self.refused = False  # the last handshake failed: the broker refused our CurveZMQ key
        self.pending: dict[str, Pending] = {}
        self._resends: list[Generate] = []

    # ---- requests ---------------------------------------------------------------------

    def open(self, request_id: str, what: str, wait_s: float, notify: Callable[[], None] | None = None,
             request: Generate | None = None) -> Pending:
        """Register a request about to be sent; a request_id already open here is refused.

        ``request``, a generate, is sent again should the connection drop before it shows output.
        """
        if request_id in self.pending:
            raise FleetError(DUPLICATE_REQUEST, f"request_id {request_id!r} is already in flight on this client",
                             request_id)
        now = self.clock.now()
        p = self.pending[request_id] = Pending(request_id, what, now, now + wait_s, notify, request=request)
        return p

    def take_resends(self) -> list[Generate]:
        """Requests to send again now (a broker is connected after a drop)."""
        out, self._resends = self._resends, []
        return out

    def forget(self, request_id: str) -> None:
        """Drop a request's record; replies that still come for it are ignored."""
        self.pending.pop(request_id, None)

    def take(self, p: Pending) -> Message | None:
        """The next reply of ``p``, or None; a local failure queued for it is raised."""
        if not p.inbox:
            return None
        item = p.inbox.popleft()
        if isinstance(item, FleetError):
            raise item
        return item

    def next_or_wait(self, p: Pending) -> tuple[Message | None, float]:
        """``p``'s next reply if one is queued, else how long to wait for one.

        A queued local failure, or a wait that has run out (``expired``), raises.
        """
        msg = self.take(p)
        if msg is not None:
            return msg, 0.0
        left_s = self.wait_until_s(p) - self.clock.now()
        if left_s <= 0:
            raise self.expired(p)
        return None, left_s

    def wait_until_s(self, p: Pending) -> float:
        """When to stop waiting for ``p``'s next reply: its deadline, or sooner while no broker is connected
        or, after a drop, until the fleet carries on with it."""
        if p.lost_at_s is not None:
            return min(p.deadline_s, p.lost_at_s + self.recover_timeout_s)
        if self.connected:
            return p.deadline_s
        return min(p.deadline_s, p.sent_s + self.connect_timeout_s)

    def expired(self, p: Pending) -> FleetError:
        """The error of a request whose wait (``wait_until_s``) has passed."""
        if p.lost_at_s is not None and p.lost_at_s + self.recover_timeout_s <= p.deadline_s:
            why = ("its stream had started, and no worker resumed it through a broker" if p.shown else
                   "no broker took it back")
            return FleetError(UNAVAILABLE, f"lost the connection to the broker at {self.addr}, and {why} within "
                              f"recover_timeout_s={self.recover_timeout_s:g}s (the broker did not come back in time, "
                              "or the worker running it was lost meanwhile); the request's outcome is unknown",
                              p.request_id)
        if not self.connected and p.sent_s + self.connect_timeout_s <= p.deadline_s:
            why = ("the broker refused our CurveZMQ key" if self.refused else
                   "no broker is connected (is the fleet running?)")
            return FleetError(UNAVAILABLE, f"{why}: nothing answered at {self.addr} within "
                              f"connect_timeout_s={self.connect_timeout_s:g}s")
        return FleetError(TIMEOUT, f"no answer from {self.addr} within the timeout ({p.what})")

    # ---- input --------------------------------------------------------------------------

    def on_frames(self, frames: list[bytes]) -> None:
        """Route one reply to its request; replies for no open request are dropped."""
        try:
            msg = decode(frames, ignore_unknown=True)
        except ProtocolError as exc:
            p = self.pending.get(exc.request_id or "")
            if p is not None:
                p.put(FleetError(BAD_REPLY, f"undecodable reply from the broker: {exc.message}", p.request_id))
            return
        p = self.pending.get(msg.request_id or "") if isinstance(msg, Addressed) else None
        if p is not None:
            if self.connected:
                p.lost_at_s = None  # the fleet carries on with it
            p.put(msg)

    def on_event(self, event: int) -> None:
        """A socket monitor event: track the link; when it drops, end the calls and keep the generates."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected, self.refused = True, False
            now = self.clock.now()
            for p in self.pending.values():
                if p.resend_due and p.request is not None:
                    p.resend_due, p.lost_at_s = False, None  # a request like any other again
                    timeout_s = p.request.timeout_s  # what is left of it
                    left_s = None if timeout_s is None else max(0.001, timeout_s - (now - p.sent_s))
                    self._resends.append(dataclasses.replace(p.request, resend=True, timeout_s=left_s))
                if p.notify is not None:
                    p.notify()  # a waiter may now wait longer
            return
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.refused = True
            text = f"the broker at {self.addr} refused our CurveZMQ key"
        elif event == zmq.EVENT_DISCONNECTED:
            text = (f"lost the connection to the broker at {self.addr} (it may have restarted); "
                    "the request's outcome is unknown")
        else:
            return
        self.connected = False
        now = self.clock.now()
        for p in list(self.pending.values()):
            if p.request is None or event != zmq.EVENT_DISCONNECTED:
                p.put(FleetError(UNAVAILABLE, text))
            elif not p.ended and not any(isinstance(m, (Done, Error)) for m in p.inbox):
                if p.lost_at_s is None:
                    p.lost_at_s = now
                # Nothing shown (read or not): safe to run again. Otherwise its worker resumes it.
                p.resend_due = not (p.shown or any(isinstance(m, Chunk) for m in p.inbox))
                if p.notify is not None:
                    p.notify()

    # ---- a generate's replies -------------------------------------------------------------

    def advance(self, p: Pending, msg: Message) -> StreamChunk | Completion | None:
        """What one reply of a generate means: a chunk, the completion, or (error) a raised FleetError."""
        if isinstance(msg, Chunk):
            out = p.output(msg.index)
            text, ids, logprobs = self._new_output(p, out, msg)
            if text is None:
                return None  # sent again after a broker restart: had it already
            out.add(text, ids, logprobs, msg.tool_calls)
            return StreamChunk(text, ids, msg.index, logprobs, msg.tool_calls)
        if isinstance(msg, Error):
            p.ended = True
            raise FleetError(msg.code, msg.message, p.request_id)
        if isinstance(msg, Done):
            p.ended = True
            return make_completion(p.request_id, msg, p.outputs)
        return None  # nothing else answers a generate

    @staticmethod
    def _new_output(p: Pending, out: Output, msg: Chunk) -> tuple[str | None, list[int], list[dict[str, Any]] | None]:
        """What of a chunk is new, by its offsets: (None, [], None) when nothing; a gap raises ``unavailable``.

        Logprobs go with token ids, one entry each: the new ids' entries are the new ones.
        """
        if msg.text_offset is None and msg.token_offset is None:
            return msg.text, msg.token_ids, msg.logprobs
        text_at, ids_at = msg.text_offset or 0, msg.token_offset or 0
        if text_at > out.chars or ids_at > len(out.ids):
            raise FleetError(UNAVAILABLE, f"part of this stream was lost on the way (it has {out.chars} characters "
                             f"and {len(out.ids)} token ids; a chunk came from {text_at} and {ids_at})", p.request_id)
        skip = len(out.ids) - ids_at
        text, ids = msg.text[out.chars - text_at:], msg.token_ids[skip:]
        if not text and not ids and (text_at < out.chars or ids_at < len(out.ids)):
            return None, [], None
        return text, ids, None if msg.logprobs is None else msg.logprobs[skip:]

    def reply(self, p: Pending, msg: Message, reply_type: type[R]) -> R | None:
        """A call's reply if ``msg`` is it; an ``error`` is raised; anything else is None."""
        if isinstance(msg, Error):
            p.ended = True
            raise FleetError(msg.code, msg.message, p.request_id)
        if isinstance(msg, reply_type):
            p.ended = True
            return msg
        return None


class ClientShell(Generic[SocketT]):
    """The socket side of both clients: a DEALER with its own routing id, its monitor, and the core.

    ``SocketT`` is what ``ctx`` makes: a blocking socket for :class:`Client`, an asyncio one
    for :class:`AsyncClient`.
    """

    def __init__(self, ctx: zmq.Context[SocketT], own_ctx: bool, connect: str, *, timeout_s: float,
                 connect_timeout_s: float, curve: dict[str, bytes] | None,
                 recover_timeout_s: float = DEFAULT_RECOVER_TIMEOUT_S) -> None:
        self.connect_addr = connect
        self.timeout_s = timeout_s
        self.routing_id = make_routing_id()
        self.core = ClientCore(connect, connect_timeout_s=connect_timeout_s, recover_timeout_s=recover_timeout_s)
        self.ctx = ctx
        self._own_ctx = own_ctx
        self.sock = make_socket(ctx, zmq.DEALER, identity=self.routing_id)
        if curve:
            apply_client(self.sock, curve)
        self._monitor = self.sock.get_monitor_socket(MONITOR_EVENTS)  # before connect: see the first handshake
        self.sock.connect(connect)
        # Sends that never wait (cancels), from any code path, the asyncio one included.
        self._now_sock = zmq.SyncSocket.shadow(self.sock.underlying)
        self.closed = False

    def _close_sockets(self) -> None:
        """Close the socket and its monitor (linger 0), and the context if it is ours; open requests end."""
        self.closed = True
        self.core.pending.clear()
        self.sock.disable_monitor()
        self._monitor.close(0)
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def _cancel_now(self, request_id: str) -> None:
        """Send ``cancel`` without waiting; with no broker to take it, it is dropped."""
        try:
            self._now_sock.send_multipart(encode_checked(Cancel(request_id)), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _forget(self, request_id: str) -> None:
        self.core.forget(request_id)

    def _abandon(self, p: Pending) -> None:
        """Stop reading ``p``; if the fleet has not ended it, cancel it there."""
        if not p.ended and not self.closed and p.request_id in self.core.pending:
            self._cancel_now(p.request_id)
        self._forget(p.request_id)
