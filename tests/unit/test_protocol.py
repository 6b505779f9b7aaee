"""Unit tests for actors.protocol: the typed messages and the bounded codec."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.control import CONTROL_TYPES, Start, Stop, SupervisorState, SupervisorStateAck
from actors.protocol import (
    BAD_REQUEST, DEFAULT_LIMITS, MESSAGE_TYPES, PROTOCOL_TAG,
    Cancel, Chunk, ControlReply, Disconnect, Dispatch, Done, Error, Generate, Heartbeat,
    Limits, Load, Message, Models, ModelsReply, Prefixes, ProtocolError, Ready, Status, StatusReply, Unload, decode, encode,
    encode_map,
    error_for, from_map, unpack_frames,
)

pytestmark = pytest.mark.timeout(30)


def frames_of(payload: Any) -> list[bytes]:
    """Two frames carrying any msgpack-able ``payload`` (valid or not)."""
    return [PROTOCOL_TAG, msgpack.packb(payload, use_bin_type=True)]


def gen_map(**fields: Any) -> dict[str, Any]:
    """A valid generate map with ``fields`` changed; a value of ``...`` removes the key."""
    base: dict[str, Any] = {"type": "generate", "request_id": "r1", "model": "demo", "prompt": "hi"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def expect_bad(frames: list[bytes], *, limits: Limits = DEFAULT_LIMITS, request_id: str | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frames, limits)
    assert info.value.code == BAD_REQUEST
    assert info.value.request_id == request_id
    return info.value


# ---- round trips -------------------------------------------------------------------

ROUND_TRIP = [
    Generate(request_id="r1", model="demo", prompt="hello"),
    Generate(
        request_id="r2", model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=7,
        temperature=0.7, top_p=0.9, top_k=40, stop=["\n", "END"], seed=123, stream=False,
        timeout_s=2.5, priority="urgent", affinity="session-9", cache=False,
    ),
    Generate(request_id="r3", model="m", prompt_tokens=[0, 1, 2**31 - 1], priority="background"),
    Cancel(request_id="r1"),
    Models(),
    Models(request_id="q1"),
    Status(),
    Status(request_id="s1"),
    Chunk(request_id="r1", text="wörld ✓", token_ids=[5, 6]),
    Chunk(request_id="r1"),
    Done(request_id="r1", finish_reason="stop"),
    Done(
        request_id="r1", finish_reason="length", usage={"prompt_tokens": 3, "completion_tokens": 4},
        timings={"queue_s": 0.001, "ttft_s": 0.02, "total_s": 0.5}, text="abc", token_ids=[1, 2, 3],
    ),
    Error(code="overloaded", message="queue full"),
    Error(code="timeout", message="too slow", request_id="r1"),
    ModelsReply(models=[{"name": "demo", "workers_ready": 2}], request_id="q1"),
    StatusReply(status={"models": {"demo": {"queue_depth": 0}}, "accepting": True}),
    Ready(worker_id="w1", model="demo", capacity=16, pid=4242, host="h", info={"blas": "openblas"}),
    Heartbeat(),
    Heartbeat(worker_id="w1", in_flight=3, free_slots=13),
    Prefixes(worker_id="w1", full=True, added=[1, 2**63 - 1]),
    Prefixes(worker_id="w1", added=[7], removed=[3, 4]),
    Dispatch(request=Generate(request_id="b1", model="demo", prompt="x", timeout_s=2.0), queue_s=0.25),
    Disconnect(),
    Disconnect(worker_id="w1", reason="shutdown"),
    Load(model="b", source="demo-small"),
    Load(model="b", source="/models/x", replicas=2, on_demand=True, idle_unload_s=30.0, request_id="l1"),
    Unload(model="b", request_id="u1"),
    ControlReply(op="load", model="b", message="starting 2 replica(s)", workers=["b-0", "b-1"], request_id="l1"),
]


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=lambda m: m.TYPE)
def test_round_trip(msg: Message) -> None:
    frames = encode(msg)
    assert frames[0] == PROTOCOL_TAG and len(frames) == 2
    back = decode(frames)
    assert type(back) is type(msg)
    assert back == msg
    assert decode(encode_map(msg.to_map())) == msg


def test_round_trip_covers_every_message_type() -> None:
    assert {m.TYPE for m in ROUND_TRIP} == set(MESSAGE_TYPES)


# The supervisor <-> broker channel's own messages (the rest of CONTROL_TYPES are wire messages above).
CONTROL_ROUND_TRIP: list[Message] = [
    Start(request_id="ctl1", model="lazy"),
    Stop(request_id="ctl2", model="b", forget=True),
    SupervisorState(),
    SupervisorState(children=[{"name": "worker:demo-0", "kind": "worker", "pid": 7, "restarts": 1, "exited_pids": [5]}],
                    models=[{"name": "demo", "source": "demo", "replicas": 1}],
                    memory={"budget_bytes": 0, "loaded_bytes": None}, supervisor_pid=6),
    SupervisorStateAck(),
    SupervisorStateAck(registered=["demo-1"], silent_workers=[{"worker_id": "demo-0", "pid": 7, "silent_for_s": 3.5}]),
]


@pytest.mark.parametrize("msg", CONTROL_ROUND_TRIP, ids=lambda m: m.TYPE)
def test_control_round_trip(msg: Message) -> None:
    back = from_map(unpack_frames(encode(msg)), registry=CONTROL_TYPES)
    assert type(back) is type(msg) and back == msg
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode(encode(msg))  # never accepted on the client or worker endpoints


def test_control_round_trip_covers_the_channel() -> None:
    assert {m.TYPE for m in CONTROL_ROUND_TRIP} | set(MESSAGE_TYPES) >= set(CONTROL_TYPES)


def test_int_widens_to_float() -> None:
    msg = decode(frames_of(gen_map(temperature=1, top_p=1, timeout_s=3)))
    assert isinstance(msg, Generate)
    assert (msg.temperature, msg.top_p, msg.timeout_s) == (1.0, 1.0, 3.0)
    assert all(isinstance(v, float) for v in (msg.temperature, msg.top_p, msg.timeout_s))


def test_none_fields_are_defaults() -> None:
    msg = decode(frames_of(gen_map(seed=None, stop=None, max_tokens=None)))
    assert isinstance(msg, Generate)
    assert (msg.seed, msg.stop, msg.max_tokens) == (None, None, 256)


def test_allowed_restricts_types() -> None:
    frames = encode(Ready(worker_id="w", model="m", capacity=1, pid=1, host="h"))
    with pytest.raises(ProtocolError) as info:
        decode(frames, allowed=frozenset({"generate", "cancel"}))
    assert info.value.code == BAD_REQUEST
    assert isinstance(decode(frames, allowed=frozenset({"ready"})), Ready)


def test_error_for_carries_code_and_request_id() -> None:
    err = error_for(ProtocolError(BAD_REQUEST, "nope", "r9"))
    assert err == Error(code=BAD_REQUEST, message="nope", request_id="r9")


# ---- bad frames ----------------------------------------------------------------------

SMALL = Limits(max_frame_bytes=64)


@pytest.mark.parametrize(
    ("frames", "limits"),
    [
        ([], DEFAULT_LIMITS),
        ([PROTOCOL_TAG], DEFAULT_LIMITS),
        ([PROTOCOL_TAG, msgpack.packb({"type": "models"}), b""], DEFAULT_LIMITS),
        ([b"MLXF0", msgpack.packb({"type": "models"})], DEFAULT_LIMITS),
        ([b"", msgpack.packb({"type": "models"})], DEFAULT_LIMITS),
        ([PROTOCOL_TAG, msgpack.packb({"type": "models", "request_id": "x" * 100})], SMALL),
        ([PROTOCOL_TAG, b""], DEFAULT_LIMITS),
        ([PROTOCOL_TAG, b"\xc1"], DEFAULT_LIMITS),  # 0xc1 is never used in msgpack
        ([PROTOCOL_TAG, b"\x81\xa4type"], DEFAULT_LIMITS),  # truncated map
        ([PROTOCOL_TAG, msgpack.packb({"type": "models"}) + b"\x00"], DEFAULT_LIMITS),  # trailing bytes
        ([PROTOCOL_TAG, b"{\"type\": \"models\"}"], DEFAULT_LIMITS),  # JSON is not msgpack
        ([PROTOCOL_TAG, msgpack.packb([1, 2, 3])], DEFAULT_LIMITS),
        ([PROTOCOL_TAG, msgpack.packb("generate")], DEFAULT_LIMITS),
        ([PROTOCOL_TAG, msgpack.packb(7)], DEFAULT_LIMITS),
        ([PROTOCOL_TAG, msgpack.packb(None)], DEFAULT_LIMITS),
        ([PROTOCOL_TAG, msgpack.packb({1: "models"})], DEFAULT_LIMITS),  # non-string map key
        ([PROTOCOL_TAG, b"\x81\xa4type\xa3\xff\xfe\xfd"], DEFAULT_LIMITS),  # invalid UTF-8 type
    ],
    ids=[
        "no-frames", "one-frame", "three-frames", "wrong-tag", "empty-tag", "oversize",
        "empty-payload", "reserved-byte", "truncated", "trailing-bytes", "json", "array", "string",
        "int", "nil", "int-key", "bad-utf8-type",
    ],
)
def test_bad_frames(frames: list[bytes], limits: Limits) -> None:
    expect_bad(frames, limits=limits)


def test_frame_at_limit_is_accepted() -> None:
    payload = msgpack.packb({"type": "models", "request_id": ""}, use_bin_type=True)
    limits = Limits(max_frame_bytes=len(payload))
    assert isinstance(decode([PROTOCOL_TAG, payload], limits), Models)
    expect_bad([PROTOCOL_TAG, payload], limits=Limits(max_frame_bytes=len(payload) - 1))


def test_invalid_utf8_in_str_field() -> None:
    # A valid map whose prompt holds the bytes ff fe as a msgpack str (not bin).
    good = msgpack.packb(gen_map(prompt="AB"), use_bin_type=True)
    bad = good.replace(b"\xa2AB", b"\xa2\xff\xfe")
    assert bad != good
    err = expect_bad([PROTOCOL_TAG, bad], request_id="r1")
    assert "'prompt'" in err.message and "UTF-8" in err.message


def test_bin_is_not_str() -> None:
    expect_bad(frames_of(gen_map(prompt=b"hi")), request_id="r1")


# ---- bad maps --------------------------------------------------------------------------

BAD_MAPS: list[tuple[str, dict[str, Any], str | None]] = [
    # (id, map, request_id the error should carry)
    ("no-type", {"request_id": "r1"}, "r1"),
    ("type-int", {"type": 3, "request_id": "r1"}, "r1"),
    ("type-none", {"type": None}, None),
    ("type-unknown", {"type": "generat", "request_id": "r1"}, "r1"),
    ("type-empty", {"type": ""}, None),
    ("unknown-field", gen_map(promt="x"), "r1"),
    ("unknown-field-cancel", {"type": "cancel", "request_id": "r1", "why": "x"}, "r1"),
    ("rid-int", gen_map(request_id=5), None),
    ("rid-too-long", gen_map(request_id="x" * 300), None),
    ("rid-empty", gen_map(request_id=""), ""),
    ("model-int", gen_map(model=1), "r1"),
    ("model-too-long", gen_map(model="m" * 300), "r1"),
    ("missing-model", gen_map(model=...), "r1"),
    ("missing-request-id", gen_map(request_id=...), None),
    ("cancel-missing-rid", {"type": "cancel"}, None),
    ("ready-missing-capacity", {"type": "ready", "worker_id": "w", "model": "m", "pid": 1, "host": "h"}, None),
    ("done-missing-finish", {"type": "done", "request_id": "r1"}, "r1"),
    ("error-missing-code", {"type": "error", "message": "m", "request_id": "r1"}, "r1"),
    ("dispatch-request-list", {"type": "dispatch", "request": [1]}, None),
    ("max-tokens-bool", gen_map(max_tokens=True), "r1"),
    ("max-tokens-float", gen_map(max_tokens=5.0), "r1"),
    ("max-tokens-str", gen_map(max_tokens="5"), "r1"),
    ("max-tokens-0", gen_map(max_tokens=0), "r1"),
    ("max-tokens-negative", gen_map(max_tokens=-1), "r1"),
    ("max-tokens-huge", gen_map(max_tokens=DEFAULT_LIMITS.max_tokens_limit + 1), "r1"),
    ("max-tokens-u64", gen_map(max_tokens=2**64 - 1), "r1"),
    ("top-k-bool", gen_map(top_k=False), "r1"),
    ("top-k-negative", gen_map(top_k=-1), "r1"),
    ("top-k-huge", gen_map(top_k=2**63), "r1"),
    ("capacity-bool", {"type": "ready", "worker_id": "w", "model": "m", "capacity": True, "pid": 1, "host": "h"}, None),
    ("temperature-bool", gen_map(temperature=True), "r1"),
    ("temperature-str", gen_map(temperature="0.5"), "r1"),
    ("temperature-negative", gen_map(temperature=-0.1), "r1"),
    ("temperature-huge", gen_map(temperature=1e9), "r1"),
    ("temperature-nan", gen_map(temperature=float("nan")), "r1"),
    ("temperature-inf", gen_map(temperature=float("inf")), "r1"),
    ("top-p-zero", gen_map(top_p=0.0), "r1"),
    ("top-p-over-one", gen_map(top_p=1.5), "r1"),
    ("top-p-nan", gen_map(top_p=float("nan")), "r1"),
    ("priority-unknown", gen_map(priority="high"), "r1"),
    ("priority-int", gen_map(priority=0), "r1"),
    ("timeout-zero", gen_map(timeout_s=0), "r1"),
    ("timeout-negative", gen_map(timeout_s=-1.0), "r1"),
    ("timeout-huge", gen_map(timeout_s=1e9), "r1"),
    ("timeout-nan", gen_map(timeout_s=float("nan")), "r1"),
    ("timeout-bool", gen_map(timeout_s=True), "r1"),
    ("seed-negative", gen_map(seed=-1), "r1"),
    ("seed-too-big", gen_map(seed=2**63), "r1"),
    ("seed-float", gen_map(seed=1.5), "r1"),
    ("stream-int", gen_map(stream=1), "r1"),
    ("cache-str", gen_map(cache="yes"), "r1"),
    ("no-input", gen_map(prompt=...), "r1"),
    ("prompt-and-messages", gen_map(messages=[{"role": "user", "content": "x"}]), "r1"),
    ("prompt-and-tokens", gen_map(prompt_tokens=[1]), "r1"),
    ("all-three", gen_map(messages=[{"role": "user", "content": "x"}], prompt_tokens=[1]), "r1"),
    ("messages-and-tokens", gen_map(prompt=..., messages=[{"role": "u", "content": "x"}], prompt_tokens=[1]), "r1"),
    ("prompt-int", gen_map(prompt=5), "r1"),
    ("prompt-too-long", gen_map(prompt="x" * (DEFAULT_LIMITS.max_prompt_chars + 1)), "r1"),
    ("tokens-empty", gen_map(prompt=..., prompt_tokens=[]), "r1"),
    ("tokens-negative", gen_map(prompt=..., prompt_tokens=[1, -1]), "r1"),
    ("tokens-too-big", gen_map(prompt=..., prompt_tokens=[2**31]), "r1"),
    ("tokens-float", gen_map(prompt=..., prompt_tokens=[1.0]), "r1"),
    ("tokens-bool", gen_map(prompt=..., prompt_tokens=[True]), "r1"),
    ("tokens-str", gen_map(prompt=..., prompt_tokens="123"), "r1"),
    ("tokens-too-many", gen_map(prompt=..., prompt_tokens=[1] * (DEFAULT_LIMITS.max_prompt_tokens + 1)), "r1"),
    ("messages-empty", gen_map(prompt=..., messages=[]), "r1"),
    ("messages-not-dicts", gen_map(prompt=..., messages=["hi"]), "r1"),
    ("messages-no-role", gen_map(prompt=..., messages=[{"content": "x"}]), "r1"),
    ("messages-content-int", gen_map(prompt=..., messages=[{"role": "user", "content": 1}]), "r1"),
    ("messages-too-long", gen_map(prompt=..., messages=[{"role": "user", "content": "x" * (DEFAULT_LIMITS.max_prompt_chars + 1)}]), "r1"),
    ("stop-str", gen_map(stop="\n"), "r1"),
    ("stop-empty-string", gen_map(stop=[""]), "r1"),
    ("stop-too-many", gen_map(stop=["a"] * (DEFAULT_LIMITS.max_stop_strings + 1)), "r1"),
    ("stop-too-long", gen_map(stop=["a" * (DEFAULT_LIMITS.max_stop_chars + 1)]), "r1"),
    ("stop-int", gen_map(stop=[1]), "r1"),
    ("affinity-too-long", gen_map(affinity="a" * 300), "r1"),
    ("usage-int-keys", {"type": "done", "request_id": "r1", "finish_reason": "stop", "usage": {1: 2}}, "r1"),
    ("chunk-token-ids-str", {"type": "chunk", "request_id": "r1", "token_ids": ["a"]}, "r1"),
    ("heartbeat-in-flight-bool", {"type": "heartbeat", "in_flight": True}, None),
    ("worker-id-too-long", {"type": "heartbeat", "worker_id": "w" * 300}, None),
]


def _packs_int_keys(obj: dict[str, Any]) -> bool:
    return any(isinstance(k, int) for v in obj.values() if isinstance(v, dict) for k in v)


@pytest.mark.parametrize(("obj", "request_id"), [(m, r) for _, m, r in BAD_MAPS], ids=[i for i, _, _ in BAD_MAPS])
def test_bad_maps(obj: dict[str, Any], request_id: str | None) -> None:
    if _packs_int_keys(obj):
        # msgpack refuses int keys on decode (strict_map_key); check from_map directly too.
        with pytest.raises(ProtocolError) as info:
            from_map(obj)
        assert info.value.code == BAD_REQUEST
        # The bounded decoder refuses it first; the refusal still names the request.
        assert "non-string key" in expect_bad(frames_of(obj), request_id=request_id).message
        return
    err = expect_bad(frames_of(obj), request_id=request_id)
    assert err.message  # a human-readable reason


def test_too_many_tokens_with_raised_array_limit() -> None:
    # With max_messages above max_prompt_tokens msgpack lets the array through, so the
    # semantic check must catch it, and it can read the request_id.
    limits = Limits(max_prompt_tokens=4, max_messages=16)
    expect_bad(frames_of(gen_map(prompt=..., prompt_tokens=[1] * 5)), limits=limits, request_id="r1")
    assert isinstance(decode(frames_of(gen_map(prompt=..., prompt_tokens=[1] * 4)), limits), Generate)


@pytest.mark.parametrize(
    ("fields", "limits"),
    [
        ({"prompt": "x" * 10}, Limits(max_prompt_chars=10)),
        ({"prompt": ..., "prompt_tokens": [0, 2**31 - 1]}, DEFAULT_LIMITS),
        ({"max_tokens": 1}, DEFAULT_LIMITS),
        ({"max_tokens": DEFAULT_LIMITS.max_tokens_limit}, DEFAULT_LIMITS),
        ({"temperature": 0}, DEFAULT_LIMITS),
        ({"temperature": 100.0}, DEFAULT_LIMITS),
        ({"top_p": 1e-9}, DEFAULT_LIMITS),
        ({"seed": 0}, DEFAULT_LIMITS),
        ({"seed": 2**63 - 1}, DEFAULT_LIMITS),
        ({"timeout_s": 86_400}, DEFAULT_LIMITS),
        ({"stop": ["a"] * 16}, DEFAULT_LIMITS),
        ({"request_id": "r" * 256}, DEFAULT_LIMITS),
    ],
)
def test_values_at_the_bounds_are_accepted(fields: dict[str, Any], limits: Limits) -> None:
    assert isinstance(decode(frames_of(gen_map(**fields)), limits), Generate)


def test_prompt_limit_is_exclusive_at_plus_one() -> None:
    limits = Limits(max_prompt_chars=10)
    expect_bad(frames_of(gen_map(prompt="x" * 11)), limits=limits, request_id="r1")


# ---- property: decode returns a Message or raises ProtocolError -----------------------


def _decode_is_total(frames: list[bytes]) -> None:
    try:
        msg = decode(frames)
    except ProtocolError as exc:
        assert exc.code == BAD_REQUEST
        assert exc.request_id is None or isinstance(exc.request_id, str)
    else:
        assert isinstance(msg, Message)
        assert type(msg) is MESSAGE_TYPES[msg.TYPE]


scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


field_names = sorted({name for cls in MESSAGE_TYPES.values() for name in _fields(cls)}) + ["type"]
keys = st.sampled_from(field_names) | st.text(max_size=8)
type_names = st.sampled_from(sorted(MESSAGE_TYPES))
maps = st.fixed_dictionaries(
    {},
    optional={
        "type": type_names | values, "request_id": st.text(max_size=8) | values, "model": values, "prompt": values,
    },
).flatmap(lambda base: st.dictionaries(keys, values, max_size=6).map(lambda extra: {**extra, **base}))


@st.composite
def typed_maps(draw: st.DrawFn) -> dict[str, Any]:
    """A known ``type`` with a random subset of that type's own fields, random values."""
    mtype = draw(type_names)
    names = _fields(MESSAGE_TYPES[mtype])
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    return {"type": mtype, **{name: draw(values) for name in chosen}}

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_decode_random_frames(frames: list[bytes]) -> None:
    _decode_is_total(frames)


@FAST
@given(st.binary(max_size=128))
def test_decode_random_payload(payload: bytes) -> None:
    _decode_is_total([PROTOCOL_TAG, payload])


@FAST
@given(maps)
def test_decode_random_maps(obj: dict[str, Any]) -> None:
    _decode_is_total(frames_of(obj))


@FAST
@given(typed_maps())
def test_decode_random_typed_maps(obj: dict[str, Any]) -> None:
    _decode_is_total(frames_of(obj))


@settings(FAST, max_examples=200)
@given(st.fixed_dictionaries({}, optional={k: values for k in _fields(Generate)}))
def test_decode_random_generate_fields(fields: dict[str, Any]) -> None:
    _decode_is_total(frames_of({"type": "generate", **fields}))
