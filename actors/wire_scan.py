"""Why the bounded decoder refused a payload, and which request it was.

msgpack's own bounds (``Limits.unpack_bounds``) fire before any field is
validated, so its exception says neither which request nor which field was at
fault. This module walks the top-level map without building its values
(``Unpacker.skip``), reads ``request_id`` and ``type`` if they are readable, and
finds the first field that breaks a bound. It runs only on refusals.
"""

from __future__ import annotations

from typing import Any

import msgpack

from actors.limits import Limits, ProtocolError
from actors.messages import BAD_REQUEST

# Fields whose item count has a limit of its own.
_ARRAY_LIMITS = {"prompt_tokens": "max_prompt_tokens", "messages": "max_messages", "stop": "max_stop_strings"}


def _entries(payload: bytes, limits: Limits) -> tuple[int | None, list[tuple[Any, bytes]]]:
    """The top-level map's size and its (key, encoded value) pairs, as far as they can be read."""
    unpacker = msgpack.Unpacker(raw=False, **limits.unpack_bounds())
    unpacker.feed(payload)
    try:
        size = unpacker.read_map_header()
    except Exception:  # not a map, or empty
        return None, []
    out: list[tuple[Any, bytes]] = []
    try:
        for _ in range(size):
            key = unpacker.unpack()
            start = unpacker.tell()
            unpacker.skip()  # builds nothing, so no bound applies and no memory is spent
            out.append((key, payload[start:unpacker.tell()]))
    except Exception:  # truncated, or a key the bounds refuse: keep what was read
        pass
    return size, out


def _read_str(data: bytes | None, limits: Limits) -> str | None:
    if data is None:
        return None
    try:
        value = msgpack.unpackb(data, raw=False, **limits.unpack_bounds())
    except Exception:
        return None
    return value if isinstance(value, str) and len(value) <= limits.max_id_chars else None


def _header_count(data: bytes) -> tuple[str, int] | None:
    """("array" | "map", item count) when ``data`` starts with a container header."""
    if not data:
        return None
    b = data[0]
    if 0x90 <= b <= 0x9F:
        return "array", b & 0x0F
    if 0x80 <= b <= 0x8F:
        return "map", b & 0x0F
    sizes = {0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4)}
    if b in sizes and len(data) > sizes[b][1]:
        kind, width = sizes[b]
        return kind, int.from_bytes(data[1:1 + width], "big")
    return None


def _value_problem(key: str, data: bytes, limits: Limits) -> str | None:
    """What in one field's encoded value breaks a bound, or None."""
    head = _header_count(data)
    if head is not None and head[0] == "array" and head[1] > limits.max_array_items:
        name = _ARRAY_LIMITS.get(key)
        bound = f"{name}={getattr(limits, name)}" if name else f"arrays hold at most {limits.max_array_items} items"
        return f"field {key!r} holds {head[1]} items; {bound}"
    if head is not None and head[0] == "map" and head[1] > limits.max_map_keys:
        return f"field {key!r} holds a map of {head[1]} keys; max_map_keys={limits.max_map_keys}"
    try:
        msgpack.unpackb(data, raw=False, **limits.unpack_bounds())
    except UnicodeDecodeError:
        return f"field {key!r} is not valid msgpack (invalid UTF-8 in a string)"
    except Exception as exc:
        text = str(exc)
        if "max_array_len" in text:
            return f"field {key!r} holds an array of more than {limits.max_array_items} items"
        if "max_map_len" in text:
            return f"field {key!r} holds a map of more than max_map_keys={limits.max_map_keys} keys"
        if "map key" in text:
            return f"field {key!r} holds a map with a non-string key"
        return f"field {key!r} is not valid msgpack ({type(exc).__name__})"
    return None


def _problem(size: int, entries: list[tuple[Any, bytes]], limits: Limits) -> str | None:
    if size > limits.max_map_keys:
        return f"the message map has {size} keys; max_map_keys={limits.max_map_keys}"
    for key, data in entries:
        if not isinstance(key, str):
            return "a map key is not a string"
        problem = _value_problem(key, data, limits)
        if problem is not None:
            return problem
    return None


def explain_refusal(payload: bytes, limits: Limits, exc: Exception) -> ProtocolError:
    """The ``bad_request`` for a payload the bounded decoder refused with ``exc``.

    It names the request when the payload holds a readable ``request_id`` (a
    string of at most ``max_id_chars``), and says which field broke which bound.
    """
    size, entries = _entries(payload, limits)
    if size is None:
        return ProtocolError(BAD_REQUEST, f"payload is not a valid msgpack map ({type(exc).__name__})")
    fields = {k: v for k, v in entries if isinstance(k, str)}
    rid = _read_str(fields.get("request_id"), limits)
    mtype = _read_str(fields.get("type"), limits)
    problem = _problem(size, entries, limits) or f"payload is not valid msgpack ({type(exc).__name__})"
    return ProtocolError(BAD_REQUEST, f"{mtype[:64]}: {problem}" if mtype else problem, rid)


def peek_request_id(payload: bytes, limits: Limits) -> str | None:
    """The ``request_id`` of a payload that is refused for another reason, if it can be read."""
    return peek_field(payload, limits, "request_id")


def peek_field(payload: bytes, limits: Limits, key: str) -> str | None:
    """A top-level string field (``max_id_chars`` at most) of a refused payload, if it can be read."""
    if len(payload) > limits.max_frame_bytes:
        return None
    _, entries = _entries(payload, limits)
    return _read_str(dict((k, v) for k, v in entries if isinstance(k, str)).get(key), limits)
