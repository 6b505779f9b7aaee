"""The op channel of a sharded group, and the watch that ends a rank whose group broke.

Every rank of a group runs the same engine operations, so the model's collectives line
up. Rank 0 decides them (it is the worker the broker sees) and sends each one to the
followers before it applies it itself. The channel is ZeroMQ, apart from MLX's ring:

- rank 0 binds a ROUTER (ops out; hellos and step reports in) and a PULL (beats in)
  on its own ring address, on ephemeral ports. The ranks learn the two ports and a
  shared random seed from one ``all_sum`` over the ring when the group forms.
- each follower connects a DEALER (identity ``rank<i>``) and a PUSH to them, says
  ``hello`` (rank, pid, host), then applies every op in order. After each step it
  reports a digest of what its step produced, and rank 0 compares it with its own: a
  group whose ranks disagree is broken.

Every message is one msgpack frame holding a list whose first item names it:

======================  =====================================================
rank 0 -> followers     ``["insert", [request map, ...]]``, ``["step", seq]``,
                        ``["remove", [key, ...], reason]``, ``["admission", n]``,
                        ``["close"]``
followers -> rank 0     ``["hello", rank, pid, host]``, ``["stepped", seq, digest]``
                        (ops socket); ``["beat", rank]`` (beat socket)
======================  =====================================================

:class:`GroupWatch` is each rank's second thread; it owns no MLX and only its own
sockets. It ends the process (exit status ``GROUP_LOST_EXIT``) when this rank's engine
operation runs past its bound (:class:`StallCheck`: a collective that never completes),
when a follower's beats stop (:class:`BeatTracker`, rank 0), or when rank 0's connection
drops (followers). The supervisor, or whatever runs the ranks, then restarts the group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import msgpack
import zmq

from actors.clock import Clock
from actors.shard_group import GROUP_LOST_EXIT
from actors.sockets import make_socket, poll_ms

log = logging.getLogger("mlx_fleet.shard")

MAX_OP_BYTES = 64 * 1024 * 1024  # an insert of a full admission batch of long prompts fits
REQUEST_FIELDS: dict[str, tuple[type, ...]] = {
    "key": (str,), "prompt_tokens": (list,), "max_tokens": (int,), "temperature": (float, int),
    "top_p": (float, int), "top_k": (int,), "seed": (int, type(None)), "stop": (list,), "cache": (bool,),
}
MAX_PENDING_STEPS = 10_000  # own step digests kept until every follower reported them
CLOSE_GRACE_S = 2.0  # a follower that lost rank 0's connection waits this long for a "close" it may not have read


class GroupLost(RuntimeError):
    """The group cannot go on: a peer is gone, hung, or disagrees."""


class OpError(ValueError):
    """A malformed message on the op channel."""


# ---- messages ------------------------------------------------------------------------

def pack(msg: list[Any]) -> bytes:
    """One channel message as its msgpack frame."""
    frame: bytes = msgpack.packb(msg, use_bin_type=True)
    return frame


def unpack(frame: bytes) -> list[Any]:
    """A channel message from its frame: a list whose first item is a string (OpError otherwise)."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)  # the socket bounds the frame's size
    except Exception as exc:  # msgpack raises several kinds for bad bytes
        raise OpError(f"undecodable message: {exc}") from None
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
        raise OpError("a channel message is a list that starts with its name")
    return msg


# Each op's arguments by type, as rank 0 sends them.
OP_SHAPES: dict[str, tuple[type, ...]] = {"insert": (list,), "step": (int,), "remove": (list, str),
                                          "admission": (int,), "close": ()}


def check_op(msg: list[Any]) -> list[Any]:
    """``msg`` if it is a well-formed op from rank 0 (OpError naming the problem otherwise)."""
    name, args = msg[0], msg[1:]
    want = OP_SHAPES.get(name)
    if want is None:
        raise OpError(f"unknown op {name!r}")
    if len(args) != len(want) or not all(isinstance(a, t) for a, t in zip(args, want)):
        raise OpError(f"op {name!r}: expected {[t.__name__ for t in want]}")
    if name == "insert":
        for req in args[0]:
            check_request(req)
    if name == "remove" and not all(isinstance(k, str) for k in args[0]):
        raise OpError("op 'remove': keys must be strings")
    return msg


def check_request(req: Any) -> None:
    """OpError unless ``req`` is an engine request map with every field of the right type."""
    if not isinstance(req, dict) or set(req) != set(REQUEST_FIELDS):
        raise OpError(f"an inserted request has the fields {sorted(REQUEST_FIELDS)}")
    for name, types in REQUEST_FIELDS.items():
        if not isinstance(req[name], types) or (types == (int,) and isinstance(req[name], bool)):
            raise OpError(f"an inserted request's {name} has the wrong type")
    if not all(isinstance(t, int) for t in req["prompt_tokens"]) or not all(isinstance(s, str) for s in req["stop"]):
        raise OpError("an inserted request's prompt_tokens are ints and its stop strings are strings")


# ---- the pure checks -------------------------------------------------------------------

class StallCheck:
    """How long this rank's current operation has run, against its bound (read by another thread)."""

    def __init__(self, clock: Clock, limit_s: float) -> None:
        self.clock = clock
        self.limit_s = limit_s
        self._current: tuple[str, float, float] | None = None  # (what, since_s, limit_s): one atomic store

    @contextlib.contextmanager
    def busy(self, what: str, limit_s: float | None = None) -> Iterator[None]:
        """Mark ``what`` as running, bounded by ``limit_s`` (default: the op bound)."""
        self._current = (what, self.clock.now(), self.limit_s if limit_s is None else limit_s)
        try:
            yield
        finally:
            self._current = None

    def stalled(self) -> str:
        """Why this rank is hung ('' while it is not)."""
        current = self._current
        if current is None:
            return ""
        what, since_s, limit_s = current
        ran_s = self.clock.now() - since_s
        return f"{what} has run {ran_s:.1f}s, over its bound of {limit_s:g}s" if ran_s > limit_s else ""


class BeatTracker:
    """When each follower was last heard from (rank 0)."""

    def __init__(self, clock: Clock, ranks: Iterable[int], timeout_s: float) -> None:
        self.clock = clock
        self.timeout_s = timeout_s
        now = clock.now()
        self.last_s = {r: now for r in ranks}

    def beat(self, rank: Any) -> None:
        """A beat from ``rank`` (unknown ranks are ignored)."""
        if rank in self.last_s:
            self.last_s[rank] = self.clock.now()

    def silent(self) -> list[int]:
        """The followers not heard from for longer than the timeout."""
        now = self.clock.now()
        return [r for r, t in sorted(self.last_s.items()) if now - t > self.timeout_s]


@dataclass
class StepLedger:
    """Rank 0's digest of each step, until every follower has reported the same one."""

    followers: frozenset[int]
    pending: dict[int, tuple[int, set[int]]] = field(default_factory=dict)  # seq -> (digest, ranks still due)
    checked: int = 0  # steps every follower agreed on

    def record(self, seq: int, digest: int) -> None:
        """Rank 0's own digest of step ``seq``."""
        if len(self.pending) >= MAX_PENDING_STEPS:
            raise GroupLost(f"followers are {len(self.pending)} steps behind in their reports")
        self.pending[seq] = (digest, set(self.followers))

    def report(self, rank: int, seq: int, digest: int) -> None:
        """A follower's digest of step ``seq``; GroupLost when it differs from rank 0's."""
        entry = self.pending.get(seq)
        if entry is None or rank not in entry[1]:
            raise GroupLost(f"rank {rank} reported step {seq}, which rank 0 has not run or it already reported")
        if digest != entry[0]:
            raise GroupLost(f"rank {rank} produced different tokens than rank 0 at step {seq}")
        entry[1].discard(rank)
        if not entry[1]:
            del self.pending[seq]
            self.checked += 1


# ---- sockets ---------------------------------------------------------------------------

class Rank0Channel:
    """Rank 0's end: the ops ROUTER and the beats PULL, bound on its ring address."""

    def __init__(self, ctx: zmq.SyncContext, host: str) -> None:
        self.ops = make_socket(ctx, zmq.ROUTER, max_msg_bytes=MAX_OP_BYTES)
        self.beats = make_socket(ctx, zmq.PULL, max_msg_bytes=4096)
        self.ops_port = self.ops.bind_to_random_port(f"tcp://{host}")
        self.beat_port = self.beats.bind_to_random_port(f"tcp://{host}")
        self.identities: dict[int, bytes] = {}
        self.rank_of: dict[bytes, int] = {}  # the same, routing id -> rank

    def wait_hellos(self, followers: Iterable[int], timeout_s: float, clock: Clock) -> dict[int, dict[str, Any]]:
        """Wait until every follower said hello; its pid and host per rank (GroupLost at the deadline)."""
        want = set(followers)
        seen: dict[int, dict[str, Any]] = {}
        deadline_s = clock.now() + timeout_s
        while set(seen) != want:
            left_s = deadline_s - clock.now()
            if left_s <= 0 or not self.ops.poll(poll_ms(left_s)):
                raise GroupLost(f"ranks {sorted(want - set(seen))} did not say hello within {timeout_s:g}s")
            ident, frame = self.ops.recv_multipart()[:2]
            try:
                msg = unpack(frame)
            except OpError:
                continue
            if len(msg) == 4 and msg[0] == "hello" and msg[1] in want:
                self.identities[msg[1]] = ident
                self.rank_of[ident] = msg[1]
                seen[msg[1]] = {"rank": msg[1], "pid": msg[2], "host": msg[3]}
        return seen

    def send(self, msg: list[Any]) -> None:
        """Send one op to every follower, without blocking; GroupLost if one cannot take it."""
        frame = pack(msg)
        for rank, ident in self.identities.items():
            try:
                self.ops.send_multipart([ident, frame], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: gone; EAGAIN: not reading
                raise GroupLost(f"rank {rank} cannot take ops: {exc}") from None

    def reports(self) -> Iterator[tuple[int, int, int]]:
        """The step reports waiting now: ``(rank, seq, digest)``."""
        while self.ops.poll(0):
            ident, frame = self.ops.recv_multipart()[:2]
            msg = unpack(frame)
            if ident in self.rank_of and len(msg) == 3 and msg[0] == "stepped":
                yield self.rank_of[ident], int(msg[1]), int(msg[2])

    def close(self, flush_s: float = 0.0) -> None:
        """Close the ops socket, giving ops still queued up to ``flush_s`` to leave (the beats
        socket belongs to the watch once it runs)."""
        self.ops.close(linger=int(flush_s * 1000))


class FollowerChannel:
    """A follower's end: the ops DEALER and the beats PUSH, connected to rank 0."""

    def __init__(self, ctx: zmq.SyncContext, rank: int, host: str, ops_port: int, beat_port: int) -> None:
        self.rank = rank
        self.ops = make_socket(ctx, zmq.DEALER, identity=f"rank{rank}".encode(), max_msg_bytes=MAX_OP_BYTES)
        # ZMTP heartbeats: a rank 0 that vanishes without closing its connection is noticed too.
        self.ops.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.ops.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        self.monitor = self.ops.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.ops.connect(f"tcp://{host}:{ops_port}")
        self.beats = make_socket(ctx, zmq.PUSH, hwm=4)
        self.beats.connect(f"tcp://{host}:{beat_port}")

    def hello(self, pid: int, host: str) -> None:
        """Introduce this rank to rank 0."""
        self.ops.send(pack(["hello", self.rank, pid, host]))

    def recv(self, timeout_ms: int) -> list[Any] | None:
        """The next op from rank 0, checked; None after ``timeout_ms``."""
        if not self.ops.poll(timeout_ms):
            return None
        return check_op(unpack(self.ops.recv()))

    def report(self, seq: int, digest: int) -> None:
        """Tell rank 0 what this rank's step ``seq`` produced."""
        self.ops.send(pack(["stepped", seq, digest]), flags=zmq.NOBLOCK)

    def close(self) -> None:
        """Close the ops socket (the monitor and beats sockets belong to the watch once it runs)."""
        self.ops.disable_monitor()
        self.ops.close(0)


# ---- the watch -------------------------------------------------------------------------

def die(reason: str) -> None:
    """End this rank now: its group is broken (the supervisor restarts the whole group)."""
    log.critical("shard group lost: %s; exiting", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(GROUP_LOST_EXIT)


class GroupWatch(threading.Thread):
    """A rank's watch: its own stalls, and its peers' liveness (see the module doc)."""

    def __init__(self, stall: StallCheck, *, rank: int, tick_s: float = 0.5, beats_in: zmq.SyncSocket | None = None,
                 tracker: BeatTracker | None = None, beats_out: zmq.SyncSocket | None = None,
                 monitor: zmq.SyncSocket | None = None, fail: Callable[[str], None] = die) -> None:
        super().__init__(name=f"shard-watch-{rank}", daemon=True)
        self.stall, self.rank, self.tick_s = stall, rank, tick_s
        self.beats_in, self.tracker, self.beats_out, self.monitor = beats_in, tracker, beats_out, monitor
        self.fail = fail
        self.stopping = threading.Event()

    def run(self) -> None:
        """Until stopped: read beats and connection events, beat, and check every bound."""
        poller = zmq.Poller()
        for sock in (self.beats_in, self.monitor):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        try:
            while not self.stopping.is_set():
                ready = dict(poller.poll(poll_ms(self.tick_s)))
                problem = self._read(ready) or self.stall.stalled() or self._silent()
                if problem and not self.stopping.is_set():
                    self.fail(problem)
                    return
                if self.beats_out is not None:
                    with contextlib.suppress(zmq.Again):
                        self.beats_out.send(pack(["beat", self.rank]), flags=zmq.NOBLOCK)
        finally:
            for sock in (self.beats_in, self.beats_out, self.monitor):
                if sock is not None:
                    sock.close(0)

    def _read(self, ready: dict[Any, int]) -> str:
        if self.beats_in is not None and self.beats_in in ready:
            while self.beats_in.poll(0):
                with contextlib.suppress(OpError):
                    msg = unpack(self.beats_in.recv())
                    if self.tracker is not None and len(msg) == 2 and msg[0] == "beat":
                        self.tracker.beat(msg[1])
        if self.monitor is not None and self.monitor in ready:
            self.monitor.recv_multipart()
            # A clean close drops the connection too, right after its "close" op: give the loop time to read it.
            if self.stopping.wait(CLOSE_GRACE_S):
                return ""
            return "the connection to rank 0 dropped"
        return ""

    def _silent(self) -> str:
        if self.tracker is None:
            return ""
        silent = self.tracker.silent()
        return f"no beat from ranks {silent} for over {self.tracker.timeout_s:g}s" if silent else ""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop watching (a clean close of the group) and wait for the thread."""
        self.stopping.set()
        if self.is_alive():
            self.join(timeout_s)

