"""Unit tests for mlx_fleet.client.core: the state both client libraries share, on a fake clock."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
import zmq

from actors.clock import FakeClock
from actors.protocol import (
    PROTOCOL_TAG, Chunk, Done, Error, Generate, Message, ModelsReply, StatusReply, encode,
)
from mlx_fleet.client.core import (
    BAD_REPLY, ClientCore, Completion, FleetError, StreamChunk, encode_checked, local_timeout_s, make_generate,
    make_routing_id,
)

pytestmark = pytest.mark.timeout(30)

ADDR = "tcp://127.0.0.1:5555"
UP, DOWN, REFUSED = zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_FAILED_AUTH


def core(connect_timeout_s: float = 5.0) -> tuple[ClientCore, FakeClock]:
    clock = FakeClock(100.0)
    return ClientCore(ADDR, connect_timeout_s=connect_timeout_s, clock=clock), clock


def raw(payload: dict[str, Any]) -> list[bytes]:
    return [PROTOCOL_TAG, msgpack.packb(payload, use_bin_type=True)]


# ---- how long a request waits, and what it gets when the wait ends ------------------------

# (events before the wait ends, request wait_s, connect_timeout_s, wait ends after s, code, words in the message)
EXPIRY = [
    ([], 120.0, 5.0, 5.0, "unavailable", ("no broker is connected", "connect_timeout_s=5s", ADDR)),
    ([UP], 120.0, 5.0, 120.0, "timeout", ("no answer from", "generate")),
    ([], 0.5, 5.0, 0.5, "timeout", ("no answer from",)),  # its own timeout comes first
    ([UP, DOWN], 120.0, 5.0, 5.0, "unavailable", ("lost the connection",)),  # the drop ends it at once
    ([REFUSED], 120.0, 5.0, 5.0, "unavailable", ("refused our CurveZMQ key",)),
    ([UP, DOWN, UP], 30.0, 5.0, 30.0, "unavailable", ("lost the connection",)),
]


@pytest.mark.parametrize("events, wait_s, connect_s, until_s, code, words", EXPIRY)
def test_what_a_waiting_request_gets(events: list[int], wait_s: float, connect_s: float, until_s: float,
                                     code: str, words: tuple[str, ...]) -> None:
    c, clock = core(connect_s)
    p = c.open("r1", "generate", wait_s)
    for event in events:
        c.on_event(event)
    assert c.wait_until_s(p) == pytest.approx(100.0 + until_s)
    if not p.inbox:  # nothing queued: it waits exactly that long
        assert c.next_or_wait(p) == (None, pytest.approx(until_s))
    clock.advance(until_s)
    with pytest.raises(FleetError) as info:
        c.next_or_wait(p)  # a queued local failure, or the expired wait
    assert info.value.code == code
    assert all(w in info.value.message for w in words), info.value.message


def test_a_broker_that_connects_in_time_lifts_the_connect_wait() -> None:
    c, clock = core(5.0)
    woken: list[str] = []
    p = c.open("r1", "generate", 60.0, notify=lambda: woken.append("r1"))
    assert c.wait_until_s(p) == pytest.approx(105.0)
    clock.advance(4.0)
    c.on_event(UP)
    assert woken == ["r1"]  # the waiter recomputes its wait
    assert c.wait_until_s(p) == pytest.approx(160.0)


def test_a_disconnect_ends_only_the_requests_open_then() -> None:
    c, _ = core()
    c.on_event(UP)
    old = c.open("old", "generate", 60.0)
    c.on_event(DOWN)
    new = c.open("new", "generate", 60.0)
    with pytest.raises(FleetError) as info:
        c.take(old)
    assert info.value.code == "unavailable"
    assert c.take(new) is None


@pytest.mark.parametrize("event", [zmq.EVENT_CONNECTED, zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CLOSED])
def test_other_events_change_nothing(event: int) -> None:
    c, _ = core()
    c.on_event(UP)
    p = c.open("r1", "generate", 60.0)
    c.on_event(event)
    assert c.connected and c.take(p) is None


# ---- routing replies ----------------------------------------------------------------------


def test_replies_go_to_their_own_request_and_strays_are_dropped() -> None:
    c, _ = core()
    a, b = c.open("a", "generate", 60.0), c.open("b", "generate", 60.0)
    for msg in (Chunk("b", "x", [1]), Chunk("zzz", "stray", [2]), Chunk("a", "y", [3]), Done("a", "stop")):
        c.on_frames(encode(msg))
    assert [c.take(a), c.take(a), c.take(a)] == [Chunk("a", "y", [3]), Done("a", "stop"), None]
    assert [c.take(b), c.take(b)] == [Chunk("b", "x", [1]), None]


def test_unknown_reply_fields_are_ignored() -> None:
    c, _ = core()
    p = c.open("q", "status", 5.0)
    c.on_frames(raw({"type": "status_reply", "request_id": "q", "status": {}, "added_later": 1}))
    assert c.take(p) == StatusReply(status={}, request_id="q")


def test_an_undecodable_reply_fails_the_request_it_names() -> None:
    c, _ = core()
    p, other = c.open("q", "models", 5.0), c.open("o", "models", 5.0)
    c.on_frames(raw({"type": "models_reply", "request_id": "q", "models": "not a list"}))
    c.on_frames(raw({"type": "nonsense"}))  # names no request: dropped
    with pytest.raises(FleetError) as info:
        c.take(p)
    assert info.value.code == BAD_REPLY and info.value.request_id == "q"
    assert c.take(other) is None


def test_a_request_id_already_open_on_this_client_is_refused() -> None:
    c, _ = core()
    c.open("same", "generate", 60.0)
    with pytest.raises(FleetError) as info:
        c.open("same", "generate", 60.0)
    assert info.value.code == "duplicate_request"
    c.forget("same")
    c.open("same", "generate", 60.0)  # free again once forgotten


# ---- what a generate's replies mean ---------------------------------------------------------

# (replies, the items advance() returns, the error code it raises at the end or None)
SEQUENCES: list[tuple[list[Message], list[Any], str | None]] = [
    ([Chunk("r", "He", [1]), Chunk("r", "llo", [2]), Done("r", "length", {"completion_tokens": 2})],
     [StreamChunk("He", [1]), StreamChunk("llo", [2]),
      Completion("r", "Hello", [1, 2], "length", {"completion_tokens": 2})], None),
    ([Done("r", "stop", text="whole", token_ids=[5, 6])], [Completion("r", "whole", [5, 6], "stop")], None),
    ([Done("r", "cancelled")], [Completion("r", "", [], "cancelled")], None),
    ([Chunk("r", "a", [1]), Error("worker_lost", "gone", "r")], [StreamChunk("a", [1])], "worker_lost"),
    ([Error("overloaded", "full", "r")], [], "overloaded"),
    ([ModelsReply(models=[], request_id="r"), Done("r", "stop")], [None, Completion("r", "", [], "stop")], None),
]


@pytest.mark.parametrize("replies, items, code", SEQUENCES)
def test_advance(replies: list[Message], items: list[Any], code: str | None) -> None:
    c, _ = core()
    p = c.open("r", "generate", 60.0)
    got: list[Any] = []
    with pytest.raises(FleetError) if code else contextlib.nullcontext() as info:
        for msg in replies:
            got.append(c.advance(p, msg))
    assert got == items
    if code:
        assert info.value.code == code and info.value.request_id == "r"
    assert p.ended == (code is not None or isinstance(got[-1], Completion))


def test_reply_returns_the_call_answer_and_raises_its_error() -> None:
    c, _ = core()
    p = c.open("q", "models", 5.0)
    assert c.reply(p, Chunk("q"), ModelsReply) is None
    assert c.reply(p, ModelsReply(models=[{"name": "m"}], request_id="q"), ModelsReply).models == [{"name": "m"}]
    with pytest.raises(FleetError) as info:
        c.reply(p, Error("unavailable", "no supervisor", "q"), ModelsReply)
    assert info.value.code == "unavailable"


# ---- helpers --------------------------------------------------------------------------------


def test_routing_ids_are_random_ascii_and_never_start_with_zero() -> None:
    ids = {make_routing_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(i.isascii() and i[:1] != b"\x00" and 1 <= len(i) <= 255 for i in ids)


def test_make_generate_takes_protocol_fields() -> None:
    msg = make_generate("m", "hi", stream=False, max_tokens=3, request_id="mine")
    assert msg == Generate(request_id="mine", model="m", prompt="hi", stream=False, max_tokens=3)
    assert make_generate("m", "hi").request_id != make_generate("m", "hi").request_id


def test_oversize_requests_are_refused_before_sending() -> None:
    with pytest.raises(FleetError) as info:
        encode_checked(make_generate("m", "x" * (5 * 1024 * 1024), request_id="big"))
    assert info.value.code == "bad_request" and info.value.request_id == "big"
    assert "max_frame_bytes" in info.value.message


@pytest.mark.parametrize("own_s, default_s, want_s", [(None, 120.0, 120.0), (1.0, 120.0, 3.0), (300.0, 10.0, 302.0)])
def test_local_timeout(own_s: float | None, default_s: float, want_s: float) -> None:
    assert local_timeout_s(own_s, default_s) == want_s


# ---- a dropped connection: resend what showed nothing, wait for the rest --------------------------


def gen(rid: str = "r1", stream: bool = True) -> Generate:
    return Generate(request_id=rid, model="m", prompt="hi", stream=stream)


def test_a_request_that_showed_nothing_is_sent_again_once_a_broker_is_back() -> None:
    c, clock = core()
    c.on_event(UP)
    quiet = c.open("quiet", "generate", 60.0, request=gen("quiet", stream=False))
    call = c.open("call", "status", 60.0)
    clock.advance(1.0)
    c.on_event(DOWN)
    with pytest.raises(FleetError) as info:
        c.take(call)  # calls end at once, as before
    assert info.value.code == "unavailable"
    assert c.take(quiet) is None and c.take_resends() == []
    assert c.wait_until_s(quiet) == pytest.approx(101.0 + 15.0)  # recover_timeout_s from the drop
    clock.advance(2.0)
    c.on_event(UP)
    (again,) = c.take_resends()
    assert again == Generate(request_id="quiet", model="m", prompt="hi", stream=False, resend=True)
    assert c.take_resends() == [] and c.wait_until_s(quiet) == pytest.approx(160.0)  # its own deadline again


def test_a_started_stream_waits_for_its_worker_and_fails_unavailable_past_recover_timeout() -> None:
    c, clock = core()
    c.on_event(UP)
    p = c.open("s", "generate", 600.0, request=gen("s"))
    c.on_frames(encode(Chunk("s", "He", [1], 0, 0)))
    assert c.advance(p, c.take(p)) == StreamChunk("He", [1])
    c.on_event(DOWN)
    c.on_event(UP)
    assert c.take_resends() == []  # it had shown output: not run again
    assert c.wait_until_s(p) == pytest.approx(100.0 + 15.0)
    clock.advance(15.0)
    with pytest.raises(FleetError) as info:
        c.next_or_wait(p)
    assert info.value.code == "unavailable" and "recover_timeout_s=15s" in info.value.message
    assert "no worker resumed it" in info.value.message


def test_a_resumed_stream_drops_what_it_had_and_waits_as_before() -> None:
    c, clock = core()
    c.on_event(UP)
    p = c.open("s", "generate", 600.0, request=gen("s"))
    c.on_frames(encode(Chunk("s", "He", [1], 0, 0)))
    c.advance(p, c.take(p))
    c.on_event(DOWN)
    c.on_frames(encode(Chunk("s", "llo", [2], 2, 1)))  # read from the old connection after the drop
    assert c.wait_until_s(p) == pytest.approx(115.0)  # still not proof that anyone carries on
    c.on_event(UP)
    c.on_frames(encode(Chunk("s", "Hello w", [1, 2, 3], 0, 0)))  # the worker sends it all again
    assert c.wait_until_s(p) == pytest.approx(700.0)
    assert [c.advance(p, c.take(p)) for _ in range(2)] == [StreamChunk("llo", [2]), StreamChunk(" w", [3])]
    for msg in (Chunk("s", "Hello w", [1, 2, 3], 0, 0), Chunk("s", "", [4], 7, 3), Done("s", "length")):
        c.on_frames(encode(msg))
    got = [c.advance(p, c.take(p)) for _ in range(3)]
    assert got[:2] == [None, StreamChunk("", [4])]
    assert (got[2].text, got[2].token_ids) == ("Hello w", [1, 2, 3, 4])


def test_a_gap_in_a_stream_fails_it() -> None:
    c, _ = core()
    p = c.open("s", "generate", 60.0, request=gen("s"))
    c.advance(p, Chunk("s", "ab", [1], 0, 0))
    with pytest.raises(FleetError) as info:
        c.advance(p, Chunk("s", "d", [3], 3, 2))
    assert info.value.code == "unavailable" and "lost on the way" in info.value.message


def test_a_request_whose_answer_waits_unread_is_neither_resent_nor_failed_by_a_drop() -> None:
    c, _ = core()
    c.on_event(UP)
    p = c.open("q", "generate", 60.0, request=gen("q", stream=False))
    c.on_frames(encode(Done("q", "stop", text="t")))
    c.on_event(DOWN)
    c.on_event(UP)
    assert c.take_resends() == [] and isinstance(c.take(p), Done) and c.take(p) is None


def test_a_resend_carries_what_is_left_of_its_timeout() -> None:
    c, clock = core()
    c.on_event(UP)
    c.open("t", "generate", 12.0, request=Generate(request_id="t", model="m", prompt="hi", timeout_s=10.0))
    clock.advance(4.0)
    c.on_event(DOWN)
    c.on_event(UP)
    (again,) = c.take_resends()
    assert again.resend and again.timeout_s == pytest.approx(6.0)


# ---- decoding controls: n completions, logprobs ---------------------------------------------

LP = [{"token": "a", "token_id": 1, "logprob": -0.1, "bytes": [97], "top_logprobs": []},
      {"token": "b", "token_id": 2, "logprob": -0.2, "bytes": [98], "top_logprobs": []}]


def test_n_streams_keep_their_own_output_and_offsets() -> None:
    """Each completion's chunks carry offsets of their own; the done's choices take the streamed text."""
    c, _ = core()
    p = c.open("r1", "generate", 10.0)
    got = [c.advance(p, Chunk("r1", "ab", [1, 2], 0, 0, index=1, logprobs=LP)),
           c.advance(p, Chunk("r1", "x", [7], 0, 0, index=0, logprobs=LP[:1])),
           c.advance(p, Chunk("r1", "ab", [1, 2], 0, 0, index=1, logprobs=LP)),  # sent again: dropped
           c.advance(p, Chunk("r1", "bc", [2, 3], 1, 1, index=1, logprobs=LP))]  # half new
    assert got[0] == StreamChunk("ab", [1, 2], 1, LP)
    assert got[2] is None
    assert got[3] == StreamChunk("c", [3], 1, LP[1:])
    done = Done("r1", "stop", {"completion_tokens": 4},
                choices=[{"index": 1, "finish_reason": "length", "completion_tokens": 3},
                         {"index": 0, "finish_reason": "stop", "completion_tokens": 1}])
    comp = c.advance(p, done)
    assert isinstance(comp, Completion) and comp.choices is not None
    assert [(ch.index, ch.text, ch.token_ids, ch.finish_reason) for ch in comp.choices] == [
        (0, "x", [7], "stop"), (1, "abc", [1, 2, 3], "length")]
    assert comp.choices[1].logprobs == LP + LP[1:]
    assert comp.text == "x" and comp.logprobs == LP[:1]


def test_a_non_streamed_done_carries_choices_and_logprobs() -> None:
    c, _ = core()
    p = c.open("r1", "generate", 10.0)
    done = Done("r1", "stop", {}, text="ab", token_ids=[1, 2], logprobs=LP, warning="w",
                tool_calls=[{"id": "c1", "name": "f", "arguments": "{}"}])
    comp = c.advance(p, done)
    assert isinstance(comp, Completion)
    assert (comp.text, comp.logprobs, comp.warning, comp.choices) == ("ab", LP, "w", None)
    assert comp.tool_calls == [{"id": "c1", "name": "f", "arguments": "{}"}]


def test_make_generate_takes_int_logit_bias_keys() -> None:
    msg = make_generate("demo", "hi", logit_bias={5: -100}, n=2, logprobs=True, top_logprobs=3)
    assert msg.logit_bias == {"5": -100} and msg.n == 2 and msg.top_logprobs == 3
