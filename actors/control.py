"""The one channel between the supervisor and the broker.

The supervisor owns processes; the broker owns routing. They talk over one
private socket pair: the supervisor binds a DEALER at
``ipc://<runtime_dir>/control`` (a 0700 folder of its own) and the broker
connects a DEALER to it. Frames are the wire protocol's (tag + one msgpack
map), decoded with the same bounded, strict codec.

supervisor -> broker: ``supervisor_state``, every second (at most every
heartbeat interval) and after each change: its children (pid, liveness,
restarts, exits), the models it runs and the memory budget. The broker answers
each with ``supervisor_state_ack``: the workers registered now, and those it
declared dead for silence (the supervisor kills one still running after
``hung_grace_s``).

broker -> supervisor: ``load`` (the client's message, re-keyed), ``start`` (an
on-demand model got a request), ``stop`` (stop a model's workers; ``forget``
drops the model too, for ``unload``). The supervisor answers each with
``control_reply`` or ``error``, by ``request_id``.

Every send is non-blocking: while the peer is down, messages are dropped (a
newer state message always follows; an unanswered call times out).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import zmq

from actors.config import FleetConfig
from actors.curve import make_local_keys
from actors.protocol import Addressed, ControlReply, Error, Load, Message, ProtocolError, encode, from_map, unpack_frames
from actors.sockets import make_socket, poll_ms

log = logging.getLogger("mlx_fleet.supervisor")

CONTROL_SOCKET = "control"
RUNTIME_PREFIX = "mlxf-run-"
OWNER_FILE = "owner.pid"  # the supervisor's pid, so a later start can tell a stale folder from a live one


@dataclass
class Start(Addressed):
    """Start the workers of an on-demand model (it has a request waiting)."""

    TYPE: ClassVar[str] = "start"
    request_id: str
    model: str


@dataclass
class Stop(Addressed):
    """Stop a model's worker processes; with ``forget`` the supervisor drops the model too."""

    TYPE: ClassVar[str] = "stop"
    request_id: str
    model: str
    forget: bool = False


@dataclass
class SupervisorState(Message):
    """What the supervisor runs.

    ``children``: one map per child process (name, kind, worker_id, model, pid,
    alive, restarts, gave_up, last_exit, exited_pids, next_start_in_s; ranks for a
    sharded group); ``models``: name, source, replicas, on_demand, idle_unload_s, shards; ``memory``:
    budget_bytes, loaded_bytes. Lists, not maps: msgpack maps are bounded to 64 keys.
    """

    TYPE: ClassVar[str] = "supervisor_state"
    children: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    supervisor_pid: int = 0


@dataclass
class SupervisorStateAck(Message):
    """The broker's answer: ids of the workers registered now, and the workers declared dead for silence
    and not registered since (``{worker_id, pid, silent_for_s}``)."""

    TYPE: ClassVar[str] = "supervisor_state_ack"
    registered: list[str] = field(default_factory=list)
    silent_workers: list[dict[str, Any]] = field(default_factory=list)


CONTROL_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Load, Start, Stop, ControlReply, Error, SupervisorState, SupervisorStateAck)
}
TO_SUPERVISOR = frozenset({"load", "start", "stop", "supervisor_state_ack"})
TO_BROKER = frozenset({"control_reply", "error", "supervisor_state"})


def control_addr(runtime_dir: str) -> str:
    """The control endpoint inside a supervisor's runtime folder."""
    return f"ipc://{Path(runtime_dir) / CONTROL_SOCKET}"


def runtime_root() -> str:
    """Where runtime folders go: /tmp (short enough for ipc:// paths), else the system's temp folder."""
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


def make_runtime_dir(root: str | None = None) -> str:
    """A private (0700) folder under ``root`` that names its owner (this process) in ``owner.pid``."""
    path = tempfile.mkdtemp(prefix=RUNTIME_PREFIX, dir=root or runtime_root())
    os.chmod(path, 0o700)
    Path(path, OWNER_FILE).write_text(f"{os.getpid()}\n")
    return path


def clean_stale_runtime_dirs(root: str | None = None) -> list[str]:
    """Remove this user's runtime folders whose owner process is gone (a supervisor killed with SIGKILL).

    A folder without a readable owner file (one being made right now, or one of
    another version) and one whose owner still runs are left alone. Returns the
    folders removed.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(root or runtime_root()))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(RUNTIME_PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            pid = int(Path(entry.path, OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and pid > 0 and not _process_exists(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def prepare_runtime(cfg: FleetConfig) -> FleetConfig:
    """The children's copy of ``cfg``, with a fresh runtime folder (control socket, local worker keys).

    Runtime folders left behind by supervisors that were killed are removed first.
    """
    if cfg.runtime_dir:
        return cfg
    for path in clean_stale_runtime_dirs():
        log.info("removed %s: its supervisor is gone", path)
    runtime_dir = make_runtime_dir()
    if cfg.curve_server_secret:
        make_local_keys(runtime_dir)
    return dataclasses.replace(cfg, runtime_dir=runtime_dir)


class SupervisorLink:
    """The supervisor's end of the channel: a bound DEALER that never blocks."""

    def __init__(self, runtime_dir: str) -> None:
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER)
        self.sock.bind(control_addr(runtime_dir))

    def send(self, msg: Message) -> bool:
        """Send to the broker; False when it was dropped (no broker connected, or it is not reading)."""
        try:
            self.sock.send_multipart(encode(msg), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def poll(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a message; True when one is ready."""
        return bool(self.sock.poll(poll_ms(timeout_s)))

    def receive(self) -> list[Message]:
        """Every message ready now, decoded; malformed ones are logged and dropped."""
        out: list[Message] = []
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            try:
                out.append(from_map(unpack_frames(frames), allowed=TO_SUPERVISOR, registry=CONTROL_TYPES))
            except ProtocolError as exc:
                log.warning("dropped malformed control message: %s", exc.message)
        return out

    def close(self) -> None:
        """Close the socket (linger 0) and its context."""
        self.sock.close(0)
        self.ctx.term()
