"""Transport: frames, the tag, routing ids, the frame-size limit and a dropped connection."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import zmq

from tests.conformance.conftest import Target
from tests.integration.clients import MAX_FRAME_BYTES, TAG, RawClient, generate, pack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_a_reply_is_two_frames_the_tag_and_one_map(wire: RawClient) -> None:
    wire.call({"type": "models", "request_id": "m1"})
    frames = wire.last_frames
    assert len(frames) == 2 and frames[0] == TAG
    reply = msgpack.unpackb(frames[1], raw=False)
    assert reply["type"] == "models_reply" and reply["request_id"] == "m1"
    assert all({"name", "workers_ready", "queue_depth", "capacity"} <= set(m) for m in reply["models"])


@pytest.mark.parametrize("mtype", ["models", "status"])
def test_calls_without_a_request_id_are_answered_without_one(wire: RawClient, mtype: str) -> None:
    wire.send({"type": mtype})
    reply = wire.recv(30)
    assert reply is not None and reply["type"] == f"{mtype}_reply"
    assert "request_id" not in reply


def test_a_new_connection_takes_its_routing_id_over(target: Target) -> None:
    """A client that reconnects under its routing id takes it from the older connection (Transport)."""
    stale = RawClient(target.addr)  # stands for a connection the client left behind
    fresh: RawClient | None = None
    try:
        assert stale.call({"type": "status", "request_id": "s1"})["type"] == "status_reply"
        fresh = RawClient(target.addr, routing_id=stale.routing_id)
        assert fresh.call({"type": "status", "request_id": "s2"})["type"] == "status_reply"
        stale.send({"type": "status", "request_id": "s3"})
        assert stale.recv(2.0) is None  # the broker no longer serves the older connection
        assert fresh.call({"type": "status", "request_id": "s4"})["type"] == "status_reply"
    finally:
        stale.close()
        if fresh is not None:
            fresh.close()


def test_a_wrong_tag_is_refused_naming_the_request(wire: RawClient) -> None:
    wire.send_frames([b"MLXF9", pack({"type": "status", "request_id": "tag"})])
    reply = wire.reply_to("tag")
    assert reply["type"] == "error" and reply["code"] == "bad_request" and "tag" in reply["message"]


@pytest.mark.parametrize("frames", [[TAG], [TAG, pack({"type": "status", "request_id": "x"}), b"extra"]])
def test_a_wrong_frame_count_is_refused(wire: RawClient, frames: list[bytes]) -> None:
    wire.send_frames(frames)
    reply = wire.recv(30)
    assert reply is not None and reply["type"] == "error" and reply["code"] == "bad_request"
    assert "frames" in reply["message"]


def test_an_unknown_field_is_refused_and_an_int_is_a_float(wire: RawClient, target: Target) -> None:
    reply = wire.call(generate("typo", target.model, max_token=4))
    assert reply["code"] == "bad_request" and "max_token" in reply["message"]
    done = wire.finish(wire.call(generate("ints", target.model, max_tokens=2, temperature=0, top_p=1))["request_id"])
    assert done.end["type"] == "done"


def _payload_of(size_bytes: int, request_id: str, model: str) -> bytes:
    """A generate payload of exactly ``size_bytes`` (an over-long ASCII prompt pads it)."""
    def build(n: int) -> bytes:
        return pack(generate(request_id, model, prompt="x" * n))

    n = size_bytes - len(build(0)) - 4  # a str32 header adds 4 bytes to a fixstr's 1
    payload = build(n)
    assert len(payload) == size_bytes, (len(payload), size_bytes)
    return payload


def test_a_frame_of_exactly_max_frame_bytes_is_read(wire: RawClient, target: Target) -> None:
    wire.send_frames([TAG, _payload_of(MAX_FRAME_BYTES, "at-limit", target.model)])
    reply = wire.reply_to("at-limit", timeout_s=60)
    # Read and decoded: refused for its prompt, not for its size, and named.
    assert reply["code"] == "bad_request" and "max_prompt_chars" in reply["message"]
    assert not [e for e in wire.read_events() if e == zmq.EVENT_DISCONNECTED]


@pytest.mark.parametrize("frames_of", [
    lambda p: [TAG, p],  # the payload, one byte over
    lambda p: [TAG + b"\x00" * MAX_FRAME_BYTES, p[:64]],  # any frame counts, not only the payload
], ids=["payload", "tag-frame"])
def test_a_frame_over_max_frame_bytes_drops_the_connection(wire: RawClient, target: Target, frames_of: Any) -> None:
    """One behaviour for every frame over the limit: no reply, the connection drops, ZeroMQ reconnects."""
    assert wire.call({"type": "status", "request_id": "before"})["type"] == "status_reply"
    wire.read_events()
    wire.send_frames(frames_of(_payload_of(MAX_FRAME_BYTES + 1, "over", target.model)))
    assert wire.wait_event(zmq.EVENT_DISCONNECTED, 30), "the connection was not dropped"
    assert wire.wait_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, 30), "ZeroMQ did not reconnect"
    after = wire.call({"type": "status", "request_id": "after"})
    assert after["type"] == "status_reply"
    assert "over" not in wire.outcomes  # no reply ever came for the oversize message
