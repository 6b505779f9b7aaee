"""The mlx-fleet wire protocol: typed messages and a bounded msgpack codec.

Every message is one ZeroMQ multipart message of two frames: the protocol tag
(``PROTOCOL_TAG``) and one msgpack map with a ``type`` key. ``docs/protocol.md``
is the reference for clients in other languages.

Decoding is strict and bounded: a frame larger than ``Limits.max_frame_bytes``,
an unknown ``type``, an unknown field, a field of the wrong type or a prompt
over the limits raises :class:`ProtocolError`, never anything else.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

PROTOCOL_TAG = b"MLXF1"

# Error codes (DESIGN.md). Strings on the wire so any language can match them.
BAD_REQUEST = "bad_request"
UNKNOWN_MODEL = "unknown_model"
OVERLOADED = "overloaded"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
WORKER_LOST = "worker_lost"
INTERNAL = "internal"
UNAVAILABLE = "unavailable"
OVER_BUDGET = "over_budget"  # a `load` would exceed the fleet's memory_budget_bytes
ERROR_CODES = frozenset(
    {BAD_REQUEST, UNKNOWN_MODEL, OVERLOADED, TIMEOUT, CANCELLED, WORKER_LOST, INTERNAL, UNAVAILABLE, OVER_BUDGET}
)

FINISH_REASONS = frozenset({"stop", "length", "cancelled"})
PRIORITIES = ("urgent", "default", "background")
# Admission order of each priority, lower first (the broker's queue and the worker's waiting list).
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
MAX_TOP_K = 1 << 20  # above any vocabulary; workers treat top_k >= vocab size as "off"


@dataclass(frozen=True)
class Limits:
    """Bounds enforced when decoding. Every field has a unit in its name."""

    max_frame_bytes: int = 4 * 1024 * 1024
    max_prompt_chars: int = 1_000_000
    max_prompt_tokens: int = 131_072
    max_messages: int = 1024
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_tokens_limit: int = 32_768
    max_id_chars: int = 256


DEFAULT_LIMITS = Limits()


class ProtocolError(Exception):
    """A message that cannot be accepted; carries the protocol error code."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class Message:
    """Base of every wire message. ``TYPE`` is the value of the ``type`` key."""

    TYPE: ClassVar[str] = ""

    def to_map(self) -> dict[str, Any]:
        """The message as a plain map, ``type`` included, ``None`` fields left out."""
        out: dict[str, Any] = {"type": self.TYPE}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


# ---- client -> broker --------------------------------------------------------


@dataclass
class Generate(Message):
    """Ask ``model`` to generate. Exactly one of prompt, messages, prompt_tokens."""

    TYPE: ClassVar[str] = "generate"
    request_id: str
    model: str
    prompt: str | None = None
    messages: list[dict] | None = None
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


@dataclass
class Cancel(Message):
    """Cancel a request (client -> broker, and broker -> worker)."""

    TYPE: ClassVar[str] = "cancel"
    request_id: str


@dataclass
class Models(Message):
    """List the models the fleet serves."""

    TYPE: ClassVar[str] = "models"
    request_id: str | None = None


@dataclass
class Status(Message):
    """Ask for the fleet's status: models, workers, queues."""

    TYPE: ClassVar[str] = "status"
    request_id: str | None = None


@dataclass
class Load(Message):
    """Start serving ``model`` from ``source`` with ``replicas`` local workers (runtime management)."""

    TYPE: ClassVar[str] = "load"
    model: str
    source: str
    replicas: int = 1
    on_demand: bool = False
    idle_unload_s: float | None = None
    request_id: str | None = None


@dataclass
class Unload(Message):
    """Stop serving ``model``: refuse new requests, drain the running ones, stop its workers."""

    TYPE: ClassVar[str] = "unload"
    model: str
    request_id: str | None = None


# ---- broker -> client (workers send chunk/done/error the same way) -----------


@dataclass
class Chunk(Message):
    """New text and token ids for a streaming request; at most one per engine step."""

    TYPE: ClassVar[str] = "chunk"
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Done(Message):
    """The terminal success message. ``text``/``token_ids`` are set when not streaming."""

    TYPE: ClassVar[str] = "done"
    request_id: str
    finish_reason: str
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    text: str | None = None
    token_ids: list[int] | None = None


@dataclass
class Error(Message):
    """The terminal failure message, or the answer to a bad call."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    request_id: str | None = None


@dataclass
class ModelsReply(Message):
    """Answer to ``models``: one map per model (name, workers_ready, ...)."""

    TYPE: ClassVar[str] = "models_reply"
    models: list[dict]
    request_id: str | None = None


@dataclass
class StatusReply(Message):
    """Answer to ``status``: a JSON-like map, see docs/protocol.md."""

    TYPE: ClassVar[str] = "status_reply"
    status: dict
    request_id: str | None = None


@dataclass
class ControlReply(Message):
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
    """A worker announces itself and its decode capacity (sequences at once)."""

    TYPE: ClassVar[str] = "ready"
    worker_id: str
    model: str
    capacity: int
    pid: int
    host: str
    info: dict = field(default_factory=dict)


@dataclass
class Heartbeat(Message):
    """Liveness, both ways. From a worker it also reports load."""

    TYPE: ClassVar[str] = "heartbeat"
    worker_id: str = ""
    in_flight: int = 0
    free_slots: int = 0
    stats: dict | None = None


@dataclass
class Dispatch(Message):
    """Broker -> worker: run this request. ``request`` is a ``generate`` map."""

    TYPE: ClassVar[str] = "dispatch"
    request: dict
    queue_s: float = 0.0


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
        ControlReply, Ready, Heartbeat, Dispatch, Disconnect,
    )
}
# Import-time check: every Message subclass here is registered under its own type.
assert all(t == c.TYPE for t, c in MESSAGE_TYPES.items())

CLIENT_TYPES = frozenset({"generate", "cancel", "models", "status", "load", "unload"})
WORKER_TYPES = frozenset({"ready", "heartbeat", "chunk", "done", "error", "disconnect"})


# ---- codec ------------------------------------------------------------------


def encode(msg: Message) -> list[bytes]:
    """The two frames of ``msg``: tag and msgpack payload."""
    return [PROTOCOL_TAG, msgpack.packb(msg.to_map(), use_bin_type=True)]


def encode_map(payload: dict[str, Any]) -> list[bytes]:
    """Frames for an already-built map (used to forward without re-validating)."""
    return [PROTOCOL_TAG, msgpack.packb(payload, use_bin_type=True)]


def unpack_frames(frames: list[bytes], limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Check tag and size, and unpack the payload map. Raises ProtocolError."""
    if len(frames) != 2:
        raise ProtocolError(BAD_REQUEST, f"expected 2 frames (tag, payload), got {len(frames)}")
    tag, payload = frames
    if tag != PROTOCOL_TAG:
        raise ProtocolError(BAD_REQUEST, f"unknown protocol tag (expected {PROTOCOL_TAG.decode()})")
    if len(payload) > limits.max_frame_bytes:
        raise ProtocolError(
            BAD_REQUEST, f"payload of {len(payload)} bytes exceeds max_frame_bytes={limits.max_frame_bytes}"
        )
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_frame_bytes,
            max_bin_len=limits.max_frame_bytes,
            max_array_len=max(limits.max_prompt_tokens, limits.max_messages),
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(BAD_REQUEST, f"payload is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "payload must be a msgpack map")
    return obj


def decode(frames: list[bytes], limits: Limits = DEFAULT_LIMITS, *, allowed: frozenset[str] | None = None) -> Message:
    """Decode and validate two frames into a typed message. Raises ProtocolError."""
    return from_map(unpack_frames(frames, limits), limits, allowed=allowed)


def from_map(obj: dict[str, Any], limits: Limits = DEFAULT_LIMITS, *, allowed: frozenset[str] | None = None,
             registry: dict[str, type[Message]] | None = None) -> Message:
    """Validate a map into a typed message (of ``registry``, default the wire types). Raises ProtocolError."""
    rid = obj.get("request_id")
    rid = rid if isinstance(rid, str) and len(rid) <= limits.max_id_chars else None
    mtype = obj.get("type")
    if not isinstance(mtype, str):
        raise ProtocolError(BAD_REQUEST, "missing or non-string 'type'", rid)
    cls = (MESSAGE_TYPES if registry is None else registry).get(mtype)
    if cls is None or (allowed is not None and mtype not in allowed):
        raise ProtocolError(BAD_REQUEST, f"unknown message type {mtype[:64]!r}", rid)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in obj.items():
        if key == "type":
            continue
        if key not in hints:
            raise ProtocolError(BAD_REQUEST, f"{mtype}: unknown field {str(key)[:64]!r}", rid)
        if value is None:
            continue
        kwargs[key] = _check_type(mtype, key, value, hints[key], rid)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(BAD_REQUEST, f"{mtype}: missing required field {f.name!r}", rid)
    msg = cls(**kwargs)
    _check_bounds(msg, limits, rid)
    return msg


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _check_type(mtype: str, key: str, value: Any, hint: Any, rid: str | None) -> Any:
    """Return ``value`` if it matches ``hint`` (ints widen to float); else raise."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    ok: bool
    if origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is bool:
        ok = isinstance(value, bool)
    elif origin is str:
        ok = isinstance(value, str)
    elif origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    elif origin is list:
        item = args[0] if args else Any
        ok = isinstance(value, list) and all(_is_instance(v, item) for v in value)
    else:
        ok = True
    if not ok:
        raise ProtocolError(BAD_REQUEST, f"{mtype}: field {key!r} must be {_type_name(hint)}", rid)
    return value


def _is_instance(value: Any, item: Any) -> bool:
    origin = typing.get_origin(item) or item
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is dict:
        return isinstance(value, dict)
    if origin is Any:
        return True
    return isinstance(value, origin)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _check_bounds(msg: Message, limits: Limits, rid: str | None) -> None:
    """Semantic bounds of the messages that carry user input."""
    for name in ("request_id", "model", "worker_id", "affinity"):
        value = getattr(msg, name, None)
        if isinstance(value, str) and len(value) > limits.max_id_chars:
            raise ProtocolError(BAD_REQUEST, f"{name} longer than {limits.max_id_chars} characters", rid)
    if isinstance(msg, Generate):
        validate_generate(msg, limits)


def validate_generate(msg: Generate, limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a generate request's values (not only types). Raises ProtocolError."""
    rid = msg.request_id

    def bad(text: str) -> ProtocolError:
        return ProtocolError(BAD_REQUEST, f"generate: {text}", rid)

    if not msg.request_id:
        raise bad("request_id must be non-empty")
    given = [x is not None for x in (msg.prompt, msg.messages, msg.prompt_tokens)]
    if sum(given) != 1:
        raise bad("give exactly one of prompt, messages, prompt_tokens")
    if msg.prompt is not None and len(msg.prompt) > limits.max_prompt_chars:
        raise bad(f"prompt longer than max_prompt_chars={limits.max_prompt_chars}")
    if msg.prompt_tokens is not None:
        if not msg.prompt_tokens:
            raise bad("prompt_tokens is empty")
        if len(msg.prompt_tokens) > limits.max_prompt_tokens:
            raise bad(f"prompt_tokens longer than max_prompt_tokens={limits.max_prompt_tokens}")
        if any(t < 0 or t >= 2**31 for t in msg.prompt_tokens):
            raise bad("prompt_tokens must be non-negative token ids")
    if msg.messages is not None:
        if not msg.messages or len(msg.messages) > limits.max_messages:
            raise bad(f"messages must hold 1..{limits.max_messages} entries")
        total = 0
        for m in msg.messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise bad("each message needs string 'role' and 'content'")
            total += len(m["content"])
        if total > limits.max_prompt_chars:
            raise bad(f"messages longer than max_prompt_chars={limits.max_prompt_chars}")
    if not 1 <= msg.max_tokens <= limits.max_tokens_limit:
        raise bad(f"max_tokens must be in 1..{limits.max_tokens_limit}")
    if not 0.0 <= msg.temperature <= 100.0:
        raise bad("temperature must be in [0, 100]")
    if not 0.0 < msg.top_p <= 1.0:
        raise bad("top_p must be in (0, 1]")
    if not 0 <= msg.top_k <= MAX_TOP_K:
        raise bad(f"top_k must be in 0..{MAX_TOP_K}")
    if msg.stop is not None:
        if len(msg.stop) > limits.max_stop_strings or any(
            not s or len(s) > limits.max_stop_chars for s in msg.stop
        ):
            raise bad(f"stop: at most {limits.max_stop_strings} non-empty strings of <= {limits.max_stop_chars} chars")
    if msg.seed is not None and not 0 <= msg.seed < 2**63:
        raise bad("seed must be in [0, 2**63)")
    if msg.timeout_s is not None and not 0.0 < msg.timeout_s <= 86_400.0:
        raise bad("timeout_s must be in (0, 86400]")
    if msg.priority not in PRIORITIES:
        raise bad(f"priority must be one of {', '.join(PRIORITIES)}")


def error_for(exc: ProtocolError) -> Error:
    """The ``error`` message that answers a ProtocolError."""
    return Error(code=exc.code, message=exc.message, request_id=exc.request_id)
