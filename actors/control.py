"""The control channel between the broker and the supervisor.

The supervisor owns processes; the broker owns routing. Runtime model management
needs both, so they talk over one private socket pair: the supervisor binds a
DEALER at ``ipc://<runtime_dir>/control`` (a 0700 folder of its own) and the
broker connects a DEALER to it. Frames are the wire protocol's (tag + one msgpack
map), decoded with the same bounded, strict codec.

broker -> supervisor: ``load`` (the client's message, re-keyed), ``start`` (an
on-demand model got a request), ``stop`` (stop a model's workers; ``forget``
drops the model too, for ``unload``).
supervisor -> broker: ``control_reply`` or ``error`` to each of those, by
``request_id``; and a ``fleet_report`` every second and on change: the models it
runs, each worker child's pid, restarts and state, and the memory budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from actors.protocol import ControlReply, Error, Load, Message

CONTROL_SOCKET = "control"


@dataclass
class Start(Message):
    """Start the workers of an on-demand model (it has a request waiting)."""

    TYPE: ClassVar[str] = "start"
    request_id: str
    model: str


@dataclass
class Stop(Message):
    """Stop a model's worker processes; with ``forget`` the supervisor drops the model too."""

    TYPE: ClassVar[str] = "stop"
    request_id: str
    model: str
    forget: bool = False


@dataclass
class FleetReport(Message):
    """What the supervisor runs: its models (name, source, replicas, on_demand, idle_unload_s),
    its worker children (worker_id, model, pid, alive, restarts, gave_up) and memory figures."""

    TYPE: ClassVar[str] = "fleet_report"
    models: list[dict] = field(default_factory=list)
    workers: list[dict] = field(default_factory=list)  # a list: msgpack maps are bounded to 64 keys
    memory: dict = field(default_factory=dict)


CONTROL_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Load, Start, Stop, ControlReply, Error, FleetReport)
}
TO_SUPERVISOR = frozenset({"load", "start", "stop"})
TO_BROKER = frozenset({"control_reply", "error", "fleet_report"})


def control_addr(runtime_dir: str) -> str:
    """The control endpoint inside a supervisor's runtime folder."""
    return f"ipc://{Path(runtime_dir) / CONTROL_SOCKET}"


def make_runtime_dir() -> str:
    """A private (0700) folder under /tmp, short enough for ipc:// paths."""
    import tempfile

    path = tempfile.mkdtemp(prefix="mlxf-run-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.chmod(path, 0o700)
    return path
