"""Socket helpers: every socket gets deliberate limits and ``linger=0``."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import zmq

from actors.protocol import DEFAULT_LIMITS

# High-water marks bound the memory a slow or absent peer can pin (messages).
DEFAULT_HWM = 10_000
# Between our own processes a frame may pass max_frame_bytes by the envelope the broker
# adds (a dispatch wraps a client's generate). The client endpoint allows no headroom.
FRAME_HEADROOM_BYTES = 4096

# A blocking socket (zmq.SyncSocket) or an asyncio one: whichever its context makes.
SocketT = TypeVar("SocketT", bound="zmq.Socket[Any]")


def make_socket(
    ctx: zmq.Context[SocketT],
    kind: int,
    *,
    hwm: int = DEFAULT_HWM,
    max_msg_bytes: int | None = DEFAULT_LIMITS.max_frame_bytes + FRAME_HEADROOM_BYTES,
    identity: bytes | None = None,
) -> SocketT:
    """A socket with linger 0, bounded queues and a maximum inbound message size."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if max_msg_bytes is not None:
        # libzmq checks each inbound frame against it and drops the connection that sent a
        # larger one, so such a frame never reaches Python.
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        # Fail loudly on sends to departed peers instead of dropping silently.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


def poll_ms(timeout_s: float) -> int:
    """A zmq poll timeout for ``timeout_s``, in whole milliseconds.

    Rounded up, so a wait under a millisecond does not become a busy ``poll(0)`` (after
    rounding off float noise: 2.007 s is 2007 ms, not 2008), and never negative: zmq waits
    forever on a negative timeout.
    """
    return max(0, math.ceil(round(timeout_s * 1000.0, 6)))


def local_addr(addr: str) -> str:
    """Where a process on this machine connects for a bind address (a wildcard binds every interface)."""
    return addr.replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:", "://127.0.0.1:")
