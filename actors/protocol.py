"""The mlx-fleet wire protocol: typed messages and a bounded msgpack codec.

Every message is one ZeroMQ multipart message of two frames: the protocol tag
(``PROTOCOL_TAG``) and one msgpack map with a ``type`` key. ``docs/protocol.md``
is the reference for clients in other languages. The message classes live in
:mod:`actors.messages` and are re-exported here, so this is the one import point.

Decoding is strict and bounded: a frame larger than ``Limits.max_frame_bytes``,
an unknown ``type``, an unknown field, a field of the wrong type or a prompt
over the limits raises :class:`ProtocolError`, never anything else. The error
names its request whenever the payload holds a readable ``request_id``, even
when the bounded decoder refused the payload (:mod:`actors.wire_scan`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import msgpack

from actors.limits import DEFAULT_LIMITS, Limits, ProtocolError
from actors.messages import (
    GRAMMAR_TYPES, MAX_LOGIT_BIAS, MAX_N, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_TOP_LOGPROBS, TOOL_CHOICES,
    BAD_REQUEST, CANCEL_BROKER_EXIT, CANCEL_CLIENT_GONE, CANCEL_NOT_ADOPTED, CANCEL_TIMEOUT, CANCELLED, CLIENT_TYPES, DEFAULT_CONNECT, DUPLICATE_REQUEST, ERROR_CODES, FINISH_REASONS, INTERNAL,
    MAX_PREFIX_REPORT, MAX_TOP_K, MESSAGE_TYPES, OVER_BUDGET, OVERLOADED, PRIORITIES, PRIORITY_RANK, PROTOCOL_TAG, TIMEOUT, UNAVAILABLE,
    UNKNOWN_MODEL, WORKER_LOST, WORKER_TYPES,
    Addressed, Cancel, Chunk, ControlReply, Disconnect, Dispatch, Done, Error, Generate, Heartbeat, Load, Message,
    Models, ModelsReply, Prefixes, Ready, Status, StatusReply, Unload,
)
from actors.generate_checks import parse_logit_bias, validate_controls, validate_tools
from actors.wire_scan import explain_refusal, peek_request_id

__all__ = [
    "BAD_REQUEST", "CANCEL_BROKER_EXIT", "CANCEL_CLIENT_GONE", "CANCEL_NOT_ADOPTED", "CANCEL_TIMEOUT", "CANCELLED", "CLIENT_TYPES", "DEFAULT_CONNECT", "DEFAULT_LIMITS", "DUPLICATE_REQUEST",
    "ERROR_CODES", "FINISH_REASONS", "GRAMMAR_TYPES", "INTERNAL", "MAX_LOGIT_BIAS", "MAX_N", "MAX_PENALTY",
    "MAX_PREFIX_REPORT", "MAX_REPETITION_PENALTY", "MAX_TOP_K", "MAX_TOP_LOGPROBS", "TOOL_CHOICES", "MESSAGE_TYPES",
    "OVER_BUDGET", "OVERLOADED",
    "PRIORITIES", "PRIORITY_RANK", "PROTOCOL_TAG", "TIMEOUT", "UNAVAILABLE", "UNKNOWN_MODEL", "WORKER_LOST",
    "WORKER_TYPES",
    "Addressed", "Cancel", "Chunk", "ControlReply", "Disconnect", "Dispatch", "Done", "Error", "Generate",
    "Heartbeat", "Limits", "Load", "Message", "Models", "ModelsReply", "Prefixes", "ProtocolError", "Ready", "Status",
    "StatusReply", "Unload",
    "decode", "encode", "encode_map", "error_for", "from_map", "parse_logit_bias", "unpack_frames", "validate_controls",
    "validate_generate", "validate_tools",
]


# ---- codec ------------------------------------------------------------------


def encode(msg: Message) -> list[bytes]:
    """The two frames of ``msg``: tag and msgpack payload."""
    return [PROTOCOL_TAG, msgpack.packb(msg.to_map(), use_bin_type=True)]


def encode_map(payload: dict[str, Any]) -> list[bytes]:
    """Frames for an already-built map (used to forward without re-validating)."""
    return [PROTOCOL_TAG, msgpack.packb(payload, use_bin_type=True)]


def unpack_frames(frames: list[bytes], limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Check tag and size, and unpack the payload map. Raises ProtocolError.

    A payload over ``max_frame_bytes`` is refused unread. Any other refusal names
    the payload's ``request_id`` when one can be read from it.
    """
    if len(frames) != 2:
        rid = peek_request_id(frames[1], limits) if len(frames) > 2 else None
        raise ProtocolError(BAD_REQUEST, f"expected 2 frames (tag, payload), got {len(frames)}", rid)
    tag, payload = frames
    if len(payload) > limits.max_frame_bytes:
        raise ProtocolError(
            BAD_REQUEST, f"payload of {len(payload)} bytes exceeds max_frame_bytes={limits.max_frame_bytes}"
        )
    if tag != PROTOCOL_TAG:
        raise ProtocolError(BAD_REQUEST, f"unknown protocol tag (expected {PROTOCOL_TAG.decode()})",
                            peek_request_id(payload, limits))
    try:
        obj = msgpack.unpackb(payload, raw=False, **limits.unpack_bounds())
    except Exception as exc:  # msgpack raises several unrelated types
        raise explain_refusal(payload, limits, exc) from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "payload must be a msgpack map")
    return obj


def decode(frames: list[bytes], limits: Limits = DEFAULT_LIMITS, *, allowed: frozenset[str] | None = None,
           ignore_unknown: bool = False) -> Message:
    """Decode and validate two frames into a typed message. Raises ProtocolError.

    ``ignore_unknown`` drops fields the message does not define instead of refusing
    them: clients read replies that way, so a newer fleet may add fields.
    """
    return from_map(unpack_frames(frames, limits), limits, allowed=allowed, ignore_unknown=ignore_unknown)


def from_map(obj: dict[str, Any], limits: Limits = DEFAULT_LIMITS, *, allowed: frozenset[str] | None = None,
             registry: dict[str, type[Message]] | None = None, ignore_unknown: bool = False) -> Message:
    """Validate a map into a typed message (of ``registry``, default the wire types). Raises ProtocolError."""
    rid = obj.get("request_id")
    rid = rid if isinstance(rid, str) and len(rid) <= limits.max_id_chars else None
    mtype = obj.get("type")
    if not isinstance(mtype, str):
        raise ProtocolError(BAD_REQUEST, "missing or non-string 'type'", rid)
    cls = (MESSAGE_TYPES if registry is None else registry).get(mtype)
    if cls is None or (allowed is not None and mtype not in allowed):
        raise ProtocolError(BAD_REQUEST, f"unknown message type {mtype[:64]!r}", rid)
    return _build(cls, mtype, obj, limits, rid, ignore_unknown)


def _build(cls: type[Message], mtype: str, obj: dict[str, Any], limits: Limits, rid: str | None,
           ignore_unknown: bool = False) -> Message:
    """``cls`` from the fields of ``obj`` (its ``type`` already checked), types and bounds enforced."""
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in obj.items():
        if key == "type":
            continue
        if key not in hints:
            if ignore_unknown:
                continue
            raise ProtocolError(BAD_REQUEST, f"{mtype}: unknown field {str(key)[:64]!r}", rid)
        if value is None:
            continue
        kwargs[key] = _check_type(mtype, key, value, hints[key], rid, limits)
    assert dataclasses.is_dataclass(cls)
    for f in dataclasses.fields(cls):
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


def _check_type(mtype: str, key: str, value: Any, hint: Any, rid: str | None, limits: Limits) -> Any:
    """Return ``value`` if it matches ``hint`` (ints widen to float); else raise.

    A field typed as a message (``Dispatch.request``) holds that message's map,
    without its ``type`` key; it is built and checked as the message itself.
    """
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:  # e.g. tool_choice: a string or a map
            for option in options:
                try:
                    return _check_type(mtype, key, value, option, rid, limits)
                except ProtocolError:
                    continue
            names = " or ".join(_type_name(typing.get_origin(o) or o) for o in options)
            raise ProtocolError(BAD_REQUEST, f"{mtype}: field {key!r} must be {names}", rid)
        hint = options[0]
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    if isinstance(origin, type) and issubclass(origin, Message):
        if not isinstance(value, dict) or value.get("type", origin.TYPE) != origin.TYPE:
            raise ProtocolError(BAD_REQUEST, f"{mtype}: field {key!r} must be a {origin.TYPE} map", rid)
        inner = value.get("request_id")
        inner_rid = inner if isinstance(inner, str) and len(inner) <= limits.max_id_chars else None
        return _build(origin, origin.TYPE, value, limits, inner_rid)
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
    for name in ("request_id", "model", "worker_id", "affinity", "client_request_id"):
        value = getattr(msg, name, None)
        if isinstance(value, str) and len(value) > limits.max_id_chars:
            raise ProtocolError(BAD_REQUEST, f"{name} of {len(value)} characters exceeds max_id_chars="
                                f"{limits.max_id_chars}", rid)
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
        raise bad(f"prompt of {len(msg.prompt)} characters exceeds max_prompt_chars={limits.max_prompt_chars}")
    if msg.prompt_tokens is not None:
        if not msg.prompt_tokens:
            raise bad("prompt_tokens is empty")
        if len(msg.prompt_tokens) > limits.max_prompt_tokens:
            raise bad(f"prompt_tokens holds {len(msg.prompt_tokens)} ids; max_prompt_tokens={limits.max_prompt_tokens}")
        if any(t < 0 or t >= 2**31 for t in msg.prompt_tokens):
            raise bad("prompt_tokens must be non-negative token ids")
    if msg.messages is not None:
        _validate_messages(msg.messages, limits, bad)
    if not 1 <= msg.max_tokens <= limits.max_tokens_limit:
        raise bad(f"max_tokens must be in 1..{limits.max_tokens_limit} (max_tokens_limit)")
    if not 0.0 <= msg.temperature <= 100.0:
        raise bad("temperature must be in [0, 100]")
    if not 0.0 < msg.top_p <= 1.0:
        raise bad("top_p must be in (0, 1]")
    if not 0 <= msg.top_k <= MAX_TOP_K:
        raise bad(f"top_k must be in 0..{MAX_TOP_K}")
    if msg.stop is not None:
        if len(msg.stop) > limits.max_stop_strings:
            raise bad(f"stop holds {len(msg.stop)} strings; max_stop_strings={limits.max_stop_strings}")
        if any(not s or len(s) > limits.max_stop_chars for s in msg.stop):
            raise bad(f"stop strings must be non-empty and at most max_stop_chars={limits.max_stop_chars} characters")
    if msg.seed is not None and not 0 <= msg.seed < 2**63:
        raise bad("seed must be in [0, 2**63)")
    if msg.timeout_s is not None and not 0.0 < msg.timeout_s <= 86_400.0:
        raise bad("timeout_s must be in (0, 86400]")
    if msg.priority not in PRIORITIES:
        raise bad(f"priority must be one of {', '.join(PRIORITIES)}")
    validate_controls(msg, limits)
    validate_tools(msg, limits)


def _validate_messages(messages: list[dict[str, Any]], limits: Limits, bad: typing.Callable[[str], ProtocolError]) -> None:
    if not messages:
        raise bad("messages is empty")
    if len(messages) > limits.max_messages:
        raise bad(f"messages holds {len(messages)} entries; max_messages={limits.max_messages}")
    total = 0
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise bad("each message needs string 'role' and 'content'")
        total += len(m["content"])
    if total > limits.max_prompt_chars:
        raise bad(f"messages hold {total} characters of content; max_prompt_chars={limits.max_prompt_chars}")


def error_for(exc: ProtocolError) -> Error:
    """The ``error`` message that answers a ProtocolError."""
    return Error(code=exc.code, message=exc.message, request_id=exc.request_id)

