"""The typed messages of the wire protocol, and its named constants.

One dataclass per ``type``. :mod:`actors.protocol` re-exports every name here
and holds the codec; ``docs/protocol.md`` is the reference for clients in
other languages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

PROTOCOL_TAG = b"MLXF1"
DEFAULT_CONNECT = "tcp://127.0.0.1:5555"  # the fleet's client endpoint unless configured otherwise

# Error codes. Strings on the wire so any language can match them.
BAD_REQUEST = "bad_request"
UNKNOWN_MODEL = "unknown_model"
OVERLOADED = "overloaded"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
WORKER_LOST = "worker_lost"
INTERNAL = "internal"
UNAVAILABLE = "unavailable"
OVER_BUDGET = "over_budget"  # a `load` would exceed the fleet's memory_budget_bytes
DUPLICATE_REQUEST = "duplicate_request"  # refuses a second generate whose request_id is in flight
ERROR_CODES = frozenset({
    BAD_REQUEST, UNKNOWN_MODEL, OVERLOADED, TIMEOUT, CANCELLED, WORKER_LOST, INTERNAL, UNAVAILABLE, OVER_BUDGET,
    DUPLICATE_REQUEST,
})

FINISH_REASONS = frozenset({"stop", "length", "cancelled", "tool_calls"})
# Why the broker cancels a request at its worker when the client did not ask (Cancel.reason).
CANCEL_TIMEOUT = "timeout"
CANCEL_CLIENT_GONE = "client_gone"
CANCEL_BROKER_EXIT = "broker_exit"  # the broker shut down and failed it
CANCEL_NOT_ADOPTED = "not_adopted"  # a row of a worker's table that a new broker could not take over
PRIORITIES = ("urgent", "default", "background")
# Admission order of each priority, lower first (the broker's queue and the worker's waiting list).
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
MAX_TOP_K = 1 << 20  # above any vocabulary; workers treat top_k >= vocab size as "off"
# Decoding controls (docs/protocol.md, generate): their bounds, checked by actors.protocol.validate_generate.
MAX_REPETITION_PENALTY = 10.0  # repetition_penalty in (0, 10]
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty in [-2, 2]
MAX_LOGIT_BIAS = 100.0  # logit_bias values in [-100, 100]
MAX_TOP_LOGPROBS = 20
MAX_N = 16  # completions of one prompt
GRAMMAR_TYPES = frozenset({"json_schema", "json_object", "regex", "lark", "choice"})
TOOL_CHOICES = frozenset({"auto", "none", "required"})


def optional(default: Any) -> Any:
    """A field that stays off the wire while it holds its default, so older peers never see it."""
    return field(default=default, metadata={"omit_default": True})


class Message:
    """Base of every wire message. ``TYPE`` is the value of the ``type`` key."""

    TYPE: ClassVar[str] = ""

    def to_map(self) -> dict[str, Any]:
        """The message as a plain map, ``type`` included, ``None`` fields left out.

        A field holding a message (``Dispatch.request``) becomes that message's map.
        """
        out: dict[str, Any] = {"type": self.TYPE}
        for name, omit, default in _wire_fields(type(self)):
            value = getattr(self, name)
            if omit and value == default:
                continue
            if isinstance(value, Message):
                out[name] = value.to_map()
            elif value is not None:
                out[name] = value
        return out


_WIRE_FIELDS: dict[type, list[tuple[str, bool, Any]]] = {}


def _wire_fields(cls: type) -> list[tuple[str, bool, Any]]:
    """Each field of a message class: its name, whether it stays off the wire at its default, the default."""
    spec = _WIRE_FIELDS.get(cls)
    if spec is None:
        assert dataclasses.is_dataclass(cls)
        spec = _WIRE_FIELDS[cls] = [(f.name, bool(f.metadata.get("omit_default")), f.default)
                                    for f in dataclasses.fields(cls)]
    return spec


class Addressed(Message):
    """A message that names a request: every one a client sends or gets, and the control calls."""

    request_id: str | None


# ---- client -> broker --------------------------------------------------------


@dataclass
class Generate(Addressed):
    """Ask ``model`` to generate. Exactly one of prompt, messages, prompt_tokens.

    The decoding controls (penalties to ``grammar``) and the tool fields default to "off"
    and are sent only when set; docs/protocol.md gives their meaning and bounds.
    """

    TYPE: ClassVar[str] = "generate"
    request_id: str
    model: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_tokens: list[int] | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] | None = None
    seed: int | None = None
    stream: bool = True
    timeout_s: float | None = None
    priority: str = "default"
    affinity: str | None = None
    cache: bool = True
    resend: bool | None = None  # true: the same request again, sent after the connection dropped (docs/protocol.md)
    repetition_penalty: float | None = None  # (0, 10]; 1.0 or None: off
    presence_penalty: float = optional(0.0)
    frequency_penalty: float = optional(0.0)
    logit_bias: dict[str, float] | None = None  # decimal token id -> bias
    min_p: float = optional(0.0)
    logprobs: bool = optional(False)
    top_logprobs: int = optional(0)
    n: int = optional(1)
    grammar: dict[str, Any] | None = None  # {"type": one of GRAMMAR_TYPES, ...}
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = optional(True)


@dataclass
class Cancel(Addressed):
    """Cancel a request (client -> broker, and broker -> worker).

    ``reason`` is set only by the broker, when the fleet rather than the client
    ends the request (``timeout``, ``client_gone``): the client sees no ``done``
    for it, so the worker leaves it out of the latency metrics.
    """

    TYPE: ClassVar[str] = "cancel"
    request_id: str
    reason: str | None = None


@dataclass
class Models(Addressed):
    """List the models the fleet serves."""

    TYPE: ClassVar[str] = "models"
    request_id: str | None = None


@dataclass
class Status(Addressed):
    """Ask for the fleet's status: models, workers, queues."""

    TYPE: ClassVar[str] = "status"
    request_id: str | None = None


@dataclass
class Load(Addressed):
    """Start serving ``model`` from ``source`` with ``replicas`` local workers (runtime management)."""

    TYPE: ClassVar[str] = "load"
    model: str
    source: str
    replicas: int = 1
    on_demand: bool = False
    idle_unload_s: float | None = None
    dtype: str | None = None  # one of actors.config.DTYPES; None: the fleet's own dtype
    request_id: str | None = None


@dataclass
class Unload(Addressed):
    """Stop serving ``model``: refuse new requests, drain the running ones, stop its workers."""

    TYPE: ClassVar[str] = "unload"
    model: str
    request_id: str | None = None


# ---- broker -> client (workers send chunk/done/error the same way) -----------


@dataclass
class Chunk(Addressed):
    """New text and token ids for a streaming request; at most one per engine step.

    ``text_offset`` (characters) and ``token_offset`` (ids) say where in the request's
    output this chunk starts, so a client drops what it already has when output is sent
    again after a broker restart.
    """

    TYPE: ClassVar[str] = "chunk"
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    text_offset: int | None = None
    token_offset: int | None = None
    index: int = optional(0)  # which of the request's n completions
    logprobs: list[dict[str, Any]] | None = None  # one entry per token id of this chunk
    tool_calls: list[dict[str, Any]] | None = None  # tool-call deltas


@dataclass
class Done(Addressed):
    """The terminal success message. ``text``/``token_ids`` are set when not streaming.

    One per request whatever its ``n``: with n > 1, ``choices`` holds each completion's end.
    """

    TYPE: ClassVar[str] = "done"
    request_id: str
    finish_reason: str
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    token_ids: list[int] | None = None
    choices: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    warning: str | None = None


@dataclass
class Error(Addressed):
    """The terminal failure message, or the answer to a bad call."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    request_id: str | None = None


@dataclass
class ModelsReply(Addressed):
    """Answer to ``models``: one map per model (name, workers_ready, ...)."""

    TYPE: ClassVar[str] = "models_reply"
    models: list[dict[str, Any]]
    request_id: str | None = None


@dataclass
class StatusReply(Addressed):
    """Answer to ``status``: a JSON-like map, see docs/protocol.md."""

    TYPE: ClassVar[str] = "status_reply"
    status: dict[str, Any]
    request_id: str | None = None


@dataclass
class ControlReply(Addressed):
    """Answer to ``load``/``unload``: what was done (``workers`` started or stopped)."""

    TYPE: ClassVar[str] = "control_reply"
    op: str
    model: str
    message: str = ""
    workers: list[str] = field(default_factory=list)
    request_id: str | None = None


# ---- worker <-> broker ------------------------------------------------------------


@dataclass
class Ready(Message):
    """A worker announces itself and its decode capacity (sequences at once).

    ``requests`` is its in-flight table when it registers again after losing its
    broker: one map per request it still holds (docs/protocol.md, Broker recovery).
    """

    TYPE: ClassVar[str] = "ready"
    worker_id: str
    model: str
    capacity: int
    pid: int
    host: str
    info: dict[str, Any] = field(default_factory=dict)
    requests: list[dict[str, Any]] | None = None


@dataclass
class Heartbeat(Message):
    """Liveness, both ways. From a worker it also reports load."""

    TYPE: ClassVar[str] = "heartbeat"
    worker_id: str = ""
    in_flight: int = 0
    free_slots: int = 0
    stats: dict[str, Any] | None = None
    steps_completed: int = 0  # engine steps the worker's MLX loop has completed
    step_elapsed_s: float = 0.0  # how long the loop has been in its current step (or work); 0 when idle


@dataclass
class Prefixes(Message):
    """Worker -> broker: the prefix keys its prompt cache gained and lost (actors/prefix_keys.py).

    ``full`` replaces whatever the broker knew of this worker's cache: a worker sends a full
    report after each ``ready``, so a new broker, or a worker that restarted, starts right. A
    report holds at most ``MAX_PREFIX_REPORT`` keys; a longer one continues in the next (not full).
    """

    TYPE: ClassVar[str] = "prefixes"
    worker_id: str = ""
    full: bool = False
    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


MAX_PREFIX_REPORT = 8192  # keys in one `prefixes` message (added and removed together)


@dataclass
class Dispatch(Message):
    """Broker -> worker: run this request; its ``request_id`` is the broker's own key for it.

    ``client`` (the client's routing id, hex) and ``client_request_id`` let the worker
    name the request's owner in its in-flight table, should it outlive this broker.
    """

    TYPE: ClassVar[str] = "dispatch"
    request: Generate
    queue_s: float = 0.0
    client: str | None = None
    client_request_id: str | None = None


@dataclass
class Disconnect(Message):
    """Either side says it is going away (worker shutdown, broker shutdown)."""

    TYPE: ClassVar[str] = "disconnect"
    worker_id: str = ""
    reason: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Generate, Cancel, Models, Status, Load, Unload, Chunk, Done, Error, ModelsReply, StatusReply,
        ControlReply, Ready, Heartbeat, Prefixes, Dispatch, Disconnect,
    )
}
# Import-time check: every message class here is registered under its own type.
if any(t != c.TYPE for t, c in MESSAGE_TYPES.items()):
    raise RuntimeError("actors.messages: a message class is registered under another type")

CLIENT_TYPES = frozenset({"generate", "cancel", "models", "status", "load", "unload"})
WORKER_TYPES = frozenset({"ready", "heartbeat", "prefixes", "chunk", "done", "error", "disconnect"})
