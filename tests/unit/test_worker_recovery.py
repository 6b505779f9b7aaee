"""Unit tests for what a worker keeps for a lost broker (workers.replies.ReplyLedger), and one
pure end-to-end recovery: an old broker, worker ledgers, a kill, a new broker that adopts the
tables, and clients that resend and drop what they already have. Fake clocks, no sockets.
"""

from __future__ import annotations

from typing import Any

import pytest
import zmq

from actors.clock import FakeClock
from actors.protocol import (
    WORKER_LOST, Cancel, Chunk, Dispatch, Done, Error, Generate, Message, Ready, encode, encode_map,
)
from broker.adoption import Adoption
from mlx_fleet.client.core import ClientCore, Completion, Pending, StreamChunk
from broker.records import Dest, Out
from broker.state import BrokerState
from workers.replies import ID_BYTES, Progress, ReplyLedger

pytestmark = pytest.mark.timeout(30)


def dispatch(key: str, *, stream: bool = True, client: str = "c1".encode().hex(), rid: str = "r1",
             timeout_s: float | None = None) -> Dispatch:
    req = Generate(request_id=key, model="m", prompt="hi", stream=stream, timeout_s=timeout_s, priority="urgent")
    return Dispatch(req, queue_s=0.25, client=client, client_request_id=rid)


def ledger(budget_bytes: int = 1000, linger_s: float = 2.0) -> tuple[ReplyLedger, FakeClock]:
    clock = FakeClock(10.0)
    return ReplyLedger(clock, budget_bytes=budget_bytes, linger_s=linger_s), clock


def chunks(msgs: list[Message]) -> list[tuple[str, list[int], int | None, int | None]]:
    return [(m.text, m.token_ids, m.text_offset, m.token_offset) for m in msgs if isinstance(m, Chunk)]


def test_chunks_say_where_they_start_and_held_back_ids_wait() -> None:
    led, _ = ledger()
    led.opened(dispatch("k"), 10.0)
    out = led.take([Progress("k", "ab", [1]), Progress("k", "", [2]), Progress("k", "c", [3]), Done("k", "stop")])
    assert chunks(out) == [("ab", [1], 0, 0), ("c", [2, 3], 2, 1)]
    assert isinstance(out[-1], Done) and led.in_flight == 0 and led.held == 1  # answered, kept a while


def test_the_table_names_each_request_its_owner_and_how_far_it_got() -> None:
    led, clock = ledger()
    led.opened(dispatch("k1", timeout_s=5.0), 10.0)
    led.opened(dispatch("k2", stream=False, rid="r2"), 10.0)
    led.take([Progress("k1", "héllo", [1, 2], completion_tokens=2), Progress("k2", "x", [9], completion_tokens=1),
              Done("k2", "length")])
    clock.advance(1.5)
    one, two = led.table()
    assert one == {"request_id": "k1", "client": "c1".encode().hex(), "client_request_id": "r1", "stream": True,
                   "started": True, "finished": False, "completion_tokens": 2, "text_chars": 5,
                   "priority": "urgent", "timeout_s": pytest.approx(3.5)}
    assert (two["started"], two["finished"], two["stream"]) == (False, True, False)


def test_the_replay_sends_everything_from_the_start_then_the_terminals() -> None:
    led, _ = ledger()
    led.opened(dispatch("k1"), 10.0)
    led.opened(dispatch("k2", stream=False), 10.0)
    led.opened(dispatch("k3"), 10.0)  # no output yet: nothing to send again
    led.take([Progress("k1", "ab", [1]), Progress("k1", "", [2]), Progress("k2", "x", [5]), Done("k2", "length")])
    replay = led.replay()
    assert chunks(replay) == [("ab", [1], 0, 0)]  # id 2 still waits for its text
    (done,) = [m for m in replay if isinstance(m, Done)]
    assert (done.request_id, done.text, done.token_ids) == ("k2", "x", [5])


def test_answered_requests_are_forgotten_linger_s_after_they_went_out_but_not_while_away() -> None:
    led, clock = ledger(linger_s=2.0)
    led.opened(dispatch("k"), 10.0)
    led.take([Done("k", "stop")])
    clock.advance(1.9)
    led.expire()
    assert led.held == 1
    led.go_away()
    clock.advance(5.0)
    led.expire()
    assert led.held == 1  # the broker may have lost it: kept until a new one has it
    led.replay()
    led.away = False
    clock.advance(2.0)
    led.expire()
    assert led.held == 0 and led.kept_bytes == 0


def test_past_the_budget_while_away_a_request_ends_with_worker_lost_and_the_loop_drops_it() -> None:
    led, _ = ledger(budget_bytes=10 + 2 * ID_BYTES)
    led.opened(dispatch("k1"), 10.0)
    led.opened(dispatch("k2"), 10.0)
    led.take([Progress("k1", "12345", [1])])
    led.go_away()
    assert len(chunks(led.take([Progress("k2", "abcde", [2])]))) == 1  # kept (the I/O thread does not send it)
    assert led.take_overflowed() == []
    assert led.take([Progress("k1", "x", [3])]) == []  # past the budget: k1 ends
    assert led.take_overflowed() == ["k1"] and led.in_flight == 1
    assert led.take([Progress("k1", "more", [4]), Done("k1", "cancelled")]) == []  # the loop's last word is dropped
    led.opened(dispatch("k3"), 10.0)
    terminals = [m for m in led.replay() if isinstance(m, Error)]
    assert [(e.request_id, e.code) for e in terminals] == [("k1", WORKER_LOST)]
    assert "recovery_buffer_bytes" in terminals[0].message


def test_going_away_over_the_budget_ends_the_largest_requests_first() -> None:
    led, _ = ledger(budget_bytes=20)
    for key, text in (("small", "ab"), ("big", "x" * 15), ("mid", "y" * 8)):
        led.opened(dispatch(key), 10.0)
        led.take([Progress(key, text, [])])
    led.go_away()
    assert led.take_overflowed() == ["big"] and led.kept_bytes == 10


def test_a_finished_request_is_superseded_by_a_new_dispatch_under_its_key() -> None:
    led, _ = ledger()
    led.opened(dispatch("k"), 10.0)
    led.take([Progress("k", "old", [1]), Done("k", "stop")])
    led.opened(dispatch("k", rid="again"), 11.0)
    assert [r["client_request_id"] for r in led.table()] == ["again"] and led.kept_bytes == 0


# ---- the whole recovery, pure -------------------------------------------------------------------

WORDS = [f"w{n} " for n in range(40)]


class World:
    """Clients (ClientCore), two workers (ReplyLedger + a scripted decoder) and a broker that can die."""

    def __init__(self) -> None:
        self.clock = FakeClock(100.0)
        self.broker = self.new_broker("a")
        self.ledgers = {w: ReplyLedger(self.clock, linger_s=3.0) for w in ("w0", "w1")}
        self.made: dict[str, int] = {}  # tokens made per worker-side key
        self.owner: dict[str, str] = {}  # worker-side key -> worker
        self.clients = {c: ClientCore("addr", clock=self.clock) for c in (b"ca", b"cb")}
        self.pending: dict[tuple[bytes, str], Pending] = {}
        self.seen: dict[tuple[bytes, str], list[StreamChunk | Completion]] = {}
        for core in self.clients.values():
            core.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.register("w0")
        self.register("w1")

    def new_broker(self, prefix: str) -> tuple[BrokerState, Adoption]:
        state = BrokerState(self.clock, models=("m",), key_prefix=prefix, heartbeat_liveness=1000)
        return state, Adoption(state, self.clock, window_s=3.0)

    def deliver(self, outs: list[Out]) -> None:
        for out in outs:
            if out.to is Dest.CLIENT:
                frames = encode(out.body) if isinstance(out.body, Message) else encode_map(out.body)
                self.clients[out.identity].on_frames(frames)
            elif out.to is Dest.WORKER and isinstance(out.body, Dispatch):
                wid = out.identity.decode()
                self.ledgers[wid].opened(out.body, self.clock.now())
                self.owner[out.body.request.request_id] = wid
            elif out.to is Dest.WORKER and isinstance(out.body, Cancel):
                wid = out.identity.decode()
                self.owner.pop(out.body.request_id, None)  # the worker stops decoding it
                self.from_worker(wid, self.ledgers[wid].cancel(out.body.request_id))

    def register(self, wid: str) -> None:
        led = self.ledgers[wid]
        msg = Ready(wid, "m", 8, 1, "h", requests=led.table() or None)
        replay = led.replay()
        led.away = False
        state, adoption = self.broker
        self.deliver(adoption.handle_ready(wid.encode(), msg))
        self.from_worker(wid, replay)

    def from_worker(self, wid: str, msgs: list[Message]) -> None:
        state, _ = self.broker
        for msg in msgs:
            self.deliver(state.handle_worker_message(wid.encode(), msg, msg.to_map()))

    def send(self, client: bytes, rid: str, *, stream: bool) -> None:
        msg = Generate(request_id=rid, model="m", prompt="p", max_tokens=12, stream=stream)
        self.pending[(client, rid)] = self.clients[client].open(rid, "generate", 60.0, request=msg)
        self.seen[(client, rid)] = []
        self.deliver(self.broker[1].handle_generate(client, msg))

    def step(self) -> None:
        """Each worker makes one token for each request it runs; the output goes out unless its broker is away."""
        for wid, led in self.ledgers.items():
            out: list[Any] = []
            for key in [k for k, w in self.owner.items() if w == wid and self.made.get(k, 0) < 12]:
                n = self.made.get(key, 0)
                self.made[key] = n + 1
                out.append(Progress(key, WORDS[n], [n], completion_tokens=n + 1))
                if n + 1 == 12:
                    out.append(Done(key, "length", {"prompt_tokens": 1, "completion_tokens": 12}))
            msgs = led.take(out)
            if not led.away:
                self.from_worker(wid, msgs)
        self.read()

    def read(self) -> None:
        for (client, rid), p in list(self.pending.items()):
            core = self.clients[client]
            while (msg := core.take(p)) is not None:
                item = core.advance(p, msg)
                if item is not None:
                    self.seen[(client, rid)].append(item)
            if p.ended:
                core.forget(rid)
                del self.pending[(client, rid)]

    def kill_broker(self, prefix: str) -> None:
        for led in self.ledgers.values():
            led.go_away()
        for core in self.clients.values():
            core.on_event(zmq.EVENT_DISCONNECTED)
        self.broker = self.new_broker(prefix)

    def clients_back(self) -> None:
        for client, core in self.clients.items():
            core.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            for msg in core.take_resends():
                self.deliver(self.broker[1].handle_generate(client, msg))


@pytest.mark.parametrize("order", ["workers_first", "clients_first"])
def test_a_broker_killed_twice_loses_nothing_repeats_nothing(order: str) -> None:
    w = World()
    for i in range(20):  # 16 slots: 4 wait in the broker, and are lost with it
        w.send(b"ca" if i % 2 else b"cb", f"q{i}", stream=i % 3 != 0)
    for _ in range(4):
        w.step()
    counters = []
    for prefix in ("b", "c"):
        w.kill_broker(prefix)
        for _ in range(3):
            w.step()  # the workers go on decoding, and keep the output
        if order == "workers_first":
            w.register("w0"), w.register("w1"), w.clients_back()
        else:
            w.clients_back(), w.register("w0"), w.register("w1")
        counters.append(dict(w.broker[1].counters))
        w.step()
    for _ in range(30):
        w.clock.advance(0.5)
        w.deliver(w.broker[1].tick())
        w.step()
    assert not w.pending
    first, second = counters
    assert first["adopted"] == 16 and first["resends_joined"] == 6 and first["resends_held"] == (
        4 if order == "workers_first" else 10)  # the 4 that waited in the dead broker run anew
    assert second["adopted"] > 0
    for (client, rid), items in w.seen.items():
        *parts, end = items
        assert isinstance(end, Completion) and end.finish_reason == "length", (rid, end)
        text = "".join(c.text for c in parts) if parts else end.text
        assert text == "".join(WORDS[:12]) == end.text, (rid, text)
        assert [t for c in parts for t in c.token_ids] == (list(range(12)) if parts else [])


def test_the_table_is_bounded_by_forgetting_the_oldest_answered_requests() -> None:
    clock = FakeClock(10.0)
    led = ReplyLedger(clock, max_rows=3)
    for key in ("old", "newer", "live", "live2"):
        led.opened(dispatch(key), clock.now())
        if key in ("old", "newer"):
            led.take([Done(key, "stop")])
        clock.advance(1.0)
    assert [r["request_id"] for r in led.table()] == ["newer", "live", "live2"]
