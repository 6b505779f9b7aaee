"""Plain records of the broker's state: workers, requests, models, the supervisor's view, and what to send."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from actors.control import SupervisorState
from actors.protocol import Generate, Message
from broker.queue import PriorityQueue

MAX_CHILDREN = 1024
MAX_EXITED_PIDS = 8


class Dest(enum.Enum):
    """Where an :class:`Out` goes: a client (frontend), a worker (backend) or the supervisor (control channel)."""

    CLIENT = "client"
    WORKER = "worker"
    CONTROL = "control"


@dataclass
class Out:
    """One message to send to ``identity`` at ``to`` (empty for the supervisor). ``body`` is a Message or a map."""

    to: Dest
    identity: bytes
    body: Message | dict[str, Any]


@dataclass
class WorkerRecord:
    """A live worker as the broker sees it."""

    identity: bytes
    worker_id: str
    model: str
    capacity: int
    pid: int
    host: str
    info: dict[str, Any]
    expiry_s: float
    last_used_s: float = 0.0
    running: set[str] = field(default_factory=set)
    reported_in_flight: int = 0
    served: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    retiring: bool = False  # being stopped (unload, idle): finishes what it runs, gets nothing new
    max_in_flight: int = 0  # the most requests it ever held at once
    step_elapsed_s: float = 0.0  # from its last heartbeat: time in its engine loop's current step
    weights: dict[str, int] = field(default_factory=dict)  # running requests that take more than one slot (n > 1)

    @property
    def free(self) -> int:
        """Slots the broker may still fill (none while retiring); a request with n completions takes n."""
        if self.retiring:
            return 0
        extra = sum(w - 1 for k, w in self.weights.items() if k in self.running) if self.weights else 0
        return self.capacity - len(self.running) - extra

    def take_slots(self, key: str, weight: int) -> None:
        """``key`` now runs here, taking ``weight`` slots."""
        self.running.add(key)
        if self.weights:
            self.weights = {k: w for k, w in self.weights.items() if k in self.running}
        if weight > 1:
            self.weights[key] = weight


@dataclass
class RequestRecord:
    """An accepted request until its one terminal reply."""

    key: str
    client: bytes
    request: Generate
    enqueued_at_s: float
    deadline_s: float
    worker: bytes | None = None
    dispatched_at_s: float = 0.0
    streamed: bool = False
    requeues: int = 0
    answered: bool = False  # the client already has its terminal reply
    cancel_sent: bool = False
    adopted: bool = False  # rebuilt from a worker's table after a broker restart: never requeued
    prefix_keys: list[int] | None = None  # its prompt's prefix keys (actors/prefix_keys.py), made when routing needs them


@dataclass
class ClientGone:
    """A client found gone (disconnected, unreachable, not reading) while it had requests open."""

    identity: bytes
    reason: str
    running: int  # requests cancelled at their workers
    queued: int  # requests dropped from the queue


@dataclass
class SilentWorker:
    """A worker declared dead because it went quiet; its process may still be running."""

    worker_id: str
    pid: int
    host: str
    since_s: float


@dataclass
class ModelRecord:
    """Per-model queue and counters."""

    name: str
    queue: PriorityQueue[RequestRecord]
    configured: bool = False
    no_worker_since_s: float | None = None
    accepting: bool = True  # False while unloading: new requests get unknown_model


# Field -> accepted types of one child entry of the supervisor's state; anything else is dropped.
_CHILD_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "worker_id": (str,), "model": (str,), "pid": (int,),
    "alive": (bool,), "restarts": (int,), "gave_up": (bool,), "last_exit": (int,),
    "exited_pids": (list,), "next_start_in_s": (float, int),
}


def clean_children(raw: list[Any]) -> list[dict[str, Any]]:
    """Keep well-typed fields of at most MAX_CHILDREN entries (the sender is trusted, not infallible)."""
    out: list[dict[str, Any]] = []
    for entry in raw[:MAX_CHILDREN]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        child: dict[str, Any] = {}
        for key, types in _CHILD_FIELDS.items():
            value = entry.get(key)
            if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
                child[key] = value
        child["exited_pids"] = [p for p in child.get("exited_pids", [])[:MAX_EXITED_PIDS]
                                if isinstance(p, int) and not isinstance(p, bool)]
        out.append(child)
    return out


@dataclass
class SupervisorView:
    """The supervisor's latest state message, its children cleaned: the one view of them in the broker."""

    children: list[dict[str, Any]]
    models: list[dict[str, Any]]
    memory: dict[str, Any]
    at_s: float

    @classmethod
    def of(cls, msg: SupervisorState, now_s: float) -> "SupervisorView":
        """The view of one state message received at ``now_s``."""
        models = [m for m in msg.models[:MAX_CHILDREN] if isinstance(m, dict)]
        return cls(clean_children(msg.children), models, dict(msg.memory), now_s)

    def workers(self) -> dict[str, dict[str, Any]]:
        """The worker children by worker_id."""
        return {c["worker_id"]: c for c in self.children if c.get("kind") == "worker" and "worker_id" in c}

    def restarts(self, kind: str) -> int:
        """Restarts of the first child of ``kind`` (e.g. the broker itself)."""
        return next((c.get("restarts", 0) for c in self.children if c.get("kind") == kind), 0)


class ReplyCounts:
    """Terminal replies sent to clients, per model. Model "" when the request named no served model."""

    def __init__(self) -> None:
        self.finished: Counter[tuple[str, str]] = Counter()  # (model, finish_reason)
        self.failed: Counter[tuple[str, str]] = Counter()  # (model, error code)
        self.prompt_tokens: Counter[str] = Counter()  # per model, from `done` usage
        self.generation_tokens: Counter[str] = Counter()

    def count(self, model: str, data: dict[str, Any]) -> None:
        """Count one terminal reply (a ``done`` or ``error`` map)."""
        kind = data.get("type")
        if kind == "done":
            self.finished[(model, str(data.get("finish_reason")))] += 1
            usage = data.get("usage")
            if isinstance(usage, dict):
                self.prompt_tokens[model] += _token_count(usage.get("prompt_tokens"))
                self.generation_tokens[model] += _token_count(usage.get("completion_tokens"))
        elif kind == "error":
            self.failed[(model, str(data.get("code")))] += 1


def _token_count(value: Any) -> int:
    """A usage figure from a worker, trusted only when it is a plausible count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31 else 0
