"""Plain records of the broker's state: workers, requests, models, and what to send.

``CLIENT`` and ``WORKER`` name the two sides an :class:`Out` may go to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.protocol import Generate, Message
from broker.queue import PriorityQueue

CLIENT = "client"
WORKER = "worker"


@dataclass
class Out:
    """One message to send: to a client or a worker identity. ``body`` is a Message or a map."""

    to: str
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
    info: dict
    expiry_s: float
    last_used_s: float = 0.0
    running: set[str] = field(default_factory=set)
    reported_in_flight: int = 0
    served: int = 0
    stats: dict = field(default_factory=dict)
    retiring: bool = False  # being stopped (unload, idle): finishes what it runs, gets nothing new
    max_in_flight: int = 0  # the most requests it ever held at once

    @property
    def free(self) -> int:
        """Slots the broker may still fill (none while retiring)."""
        return 0 if self.retiring else self.capacity - len(self.running)


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
