"""A seeded generator of malformed client messages, each of which must get ``bad_request``.

Every input is invalid by construction (random bytes, truncated or mistyped
msgpack, out-of-range values, invalid UTF-8, wrong frame counts, types a client
may not send), so the broker must answer each with exactly one ``bad_request``.
The same seed always yields the same inputs.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterator

from tests.integration.clients import TAG, pack

VALID: dict[str, Any] = {"type": "generate", "request_id": "fz", "model": "demo", "prompt": "hello", "max_tokens": 4}

# field -> values that are each invalid for it (wrong type or out of range; None would mean "absent")
BAD_VALUES: dict[str, list[Any]] = {
    "request_id": ["", 5, ["x"], "r" * 300, b"bytes"],
    "model": [7, 1.5, ["demo"], {"a": 1}, "m" * 300],
    "prompt": [5, ["a"], b"raw", "x" * 1_000_001],
    "max_tokens": [0, -1, -(2 ** 63), 10 ** 9, 2 ** 64 - 1, 1.5, "4", True],
    "temperature": [-0.1, -1e308, 101.0, math.inf, -math.inf, math.nan, "hot"],
    "top_p": [0.0, -0.5, 1.0001, math.nan, math.inf, [1]],
    "top_k": [-1, -(2 ** 40), 2 ** 21, 2 ** 63, 1.0],
    "seed": [-1, 2 ** 63, 2 ** 64 - 1, "7", 0.5],
    "timeout_s": [0, -1.0, 1e9, math.nan, math.inf, "soon"],
    "priority": ["now", "", 1],
    "stop": ["x", [""], ["s" * 300], ["a"] * 17, [1], [None]],
    "stream": [1, "yes", 0.0],
    "prompt_tokens": [[], [-1], [2 ** 31], [1.5], "123", [True]],
    "messages": [[], [{"role": "user"}], [{"role": 1, "content": "x"}], ["hi"], [{"content": "x"}]],
    "affinity": [5, "a" * 300],
    "cache": ["yes", 1],
}
CLIENT_FORBIDDEN_TYPES = ["ready", "heartbeat", "dispatch", "chunk", "done", "error", "disconnect",
                          "fleet_info", "fleet_info_ack", "models_reply", "status_reply", "teleport", ""]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """Any msgpack-encodable value: numbers at the edges, odd strings, nesting."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([0, -1, 1, 2 ** 31, -(2 ** 63), 2 ** 64 - 1, rng.randrange(-10 ** 6, 10 ** 6)])
    if kind == 1:
        return rng.choice([0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, rng.uniform(-1e3, 1e3)])
    if kind == 2:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD7FF), 0])) for _ in range(rng.randrange(12)))
    if kind == 3:
        return rng.randbytes(rng.randrange(16))
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5:
        return rng.choice(["generate", "cancel", "status", "models", "type"])
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 7:
        return {random_value(rng, 3) if rng.random() < 0.2 else f"k{rng.randrange(99)}": random_value(rng, depth + 1)
                for _ in range(rng.randrange(5))}
    return {"type": rng.choice(["generate", "cancel", "status"]), "junk": random_value(rng, depth + 1)}


def _mutated_generate(rng: random.Random, *, large: bool = True) -> list[bytes]:
    msg = dict(VALID)
    for _ in range(rng.randrange(1, 4)):
        field = rng.choice(list(BAD_VALUES))
        value = rng.choice(BAD_VALUES[field])
        msg[field] = value if large or not isinstance(value, str) or len(value) < 4096 else -1
    return [TAG, pack(msg)]


def _missing_or_extra(rng: random.Random) -> list[bytes]:
    msg = dict(VALID)
    if rng.random() < 0.5:
        del msg[rng.choice(["request_id", "model", "prompt"])]
    else:
        msg[f"unknown_{rng.randrange(1000)}"] = random_value(rng)
    return [TAG, pack(msg)]


def _invalid_utf8(rng: random.Random) -> list[bytes]:
    bad = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"abc\x80"])
    field = rng.choice(["prompt", "model", "request_id"])
    placeholder = "@" * len(bad)
    raw = pack({**VALID, field: placeholder})
    return [TAG, raw.replace(bytes([0xA0 | len(bad)]) + placeholder.encode(), bytes([0xA0 | len(bad)]) + bad, 1)]


def _random_frames(rng: random.Random) -> list[bytes]:
    count = rng.choice([1, 1, 2, 2, 3, 4])
    frames = [rng.randbytes(rng.randrange(64)) for _ in range(count)]
    if count == 2 and frames[0] == TAG:
        frames[0] = b"XX"
    return frames


def _random_msgpack(rng: random.Random) -> list[bytes]:
    obj = random_value(rng)
    if isinstance(obj, dict) and obj.get("type") in ("status", "models", "cancel"):
        obj["type"] = "nope"  # keep it invalid
    return [TAG, pack(obj)]


def _truncated(rng: random.Random) -> list[bytes]:
    raw = pack({**VALID, "prompt": "p" * rng.randrange(1, 200)})
    return [TAG, raw[: rng.randrange(1, len(raw) - 1)]]


def _wrong_frame_count(rng: random.Random) -> list[bytes]:
    payload = pack(VALID)
    return rng.choice([[payload], [TAG], [TAG, payload, b""], [b"", TAG, payload],
                       [TAG, b""], [b"", b""]])


def _forbidden_type(rng: random.Random) -> list[bytes]:
    return [TAG, pack({"type": rng.choice(CLIENT_FORBIDDEN_TYPES), "request_id": "fz", "worker_id": "w"})]


def _mistyped_small_calls(rng: random.Random) -> list[bytes]:
    return [TAG, pack(rng.choice([
        {"type": "cancel"}, {"type": "cancel", "request_id": 5}, {"type": "status", "request_id": ["x"]},
        {"type": "models", "extra": 1}, {"type": 5}, {"request_id": "x"}, {"type": None},
    ]))]


def _large_garbage(rng: random.Random) -> list[bytes]:
    # Big but under max_frame_bytes: the broker must read, reject and free it.
    size = rng.choice([64 * 1024, 512 * 1024, 2 * 1024 * 1024])
    return [TAG, pack({**VALID, "prompt": "x" * size, "max_tokens": -1})]


GENERATORS: list[tuple[float, Callable[[random.Random], list[bytes]]]] = [
    (3.0, _mutated_generate), (1.0, _missing_or_extra), (1.0, _invalid_utf8), (1.0, _random_frames),
    (2.0, _random_msgpack), (1.0, _truncated), (0.5, _wrong_frame_count), (0.5, _forbidden_type),
    (0.5, _mistyped_small_calls), (0.02, _large_garbage),
]


def malformed_inputs(seed: int, count: int, *, large: bool = True) -> Iterator[list[bytes]]:
    """``count`` malformed multipart messages, reproducibly from ``seed``.

    ``large=False`` leaves out the megabyte-sized ones, whose transient buffers
    make RSS jump by a few MiB either way and would hide a slow per-message leak.
    """
    rng = random.Random(seed)
    chosen = [(w, m) for w, m in GENERATORS if large or m is not _large_garbage]
    weights = [w for w, _ in chosen]
    makers = [m for _, m in chosen]
    for _ in range(count):
        maker = rng.choices(makers, weights)[0]
        yield _mutated_generate(rng, large=large) if maker is _mutated_generate else maker(rng)
