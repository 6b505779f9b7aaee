"""Which client speaks over which connection: turns the frontend's disconnect events into clients gone.

A ROUTER's monitor reports a connection's file descriptor when it is accepted
and when it drops, never the routing id of the peer behind it. Each message a
client sends tells the broker the descriptor it came over (ZeroMQ's
``SRCFD`` message property), so the broker learns, per routing id, its latest
connection. When that connection drops, the client is gone.

Descriptors are reused by the kernel. A connection's ``disconnected`` event is
emitted before its descriptor is closed, and a new connection's ``accepted``
event before its first message arrives. So the actor drains the monitor before
it records a message's descriptor, and a descriptor seen ``accepted`` again
ends whatever clients were still mapped to its previous connection.
"""

from __future__ import annotations


class ClientConnections:
    """Routing ids by connection (file descriptor) and back; pure, no sockets."""

    def __init__(self) -> None:
        self.fd_of: dict[bytes, int] = {}  # routing id -> descriptor of its latest message
        self.on_fd: dict[int, set[bytes]] = {}  # descriptor -> routing ids seen on it

    def seen(self, identity: bytes, fd: int) -> None:
        """A message from ``identity`` came over connection ``fd`` (negative: unknown, ignored)."""
        if fd < 0 or self.fd_of.get(identity) == fd:
            return
        old = self.fd_of.get(identity)
        if old is not None:
            self._unmap(identity, old)
        self.fd_of[identity] = fd
        self.on_fd.setdefault(fd, set()).add(identity)

    def closed(self, fd: int) -> list[bytes]:
        """Connection ``fd`` dropped: the routing ids whose latest connection it was."""
        gone = sorted(self.on_fd.pop(fd, ()))
        for identity in gone:
            del self.fd_of[identity]
        return gone

    def accepted(self, fd: int) -> list[bytes]:
        """A new connection got descriptor ``fd``: any id still mapped to it belonged to a connection now closed."""
        return self.closed(fd)

    def forget(self, identity: bytes) -> None:
        """Stop tracking ``identity`` (it is known to be gone)."""
        fd = self.fd_of.pop(identity, None)
        if fd is not None:
            self._unmap(identity, fd)

    def _unmap(self, identity: bytes, fd: int) -> None:
        ids = self.on_fd.get(fd)
        if ids is not None:
            ids.discard(identity)
            if not ids:
                del self.on_fd[fd]


def client_name(identity: bytes) -> str:
    """A routing id for the log: as text when it is printable ASCII (our clients' ids are), else in hex."""
    text = identity.decode("ascii", errors="replace")
    return text[:40] if text.isascii() and text.isprintable() and "\ufffd" not in text else identity.hex()[:40]
