"""A BrokerState under test: everything it says, recorded, and the protocol's promise, checked.

The broker's unit tests drive a :class:`Fleet`: a ``BrokerState`` on a fake clock whose
workers and clients are played by hand. It records each ``Out`` the state returns, and
``Fleet.check`` holds the state to the promise of docs/protocol.md: every accepted
``generate`` gets exactly one terminal message (``done`` or ``error``) and nothing after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.clock import FakeClock
from actors.protocol import Chunk, Dispatch, Done, Error, Generate, Heartbeat, Message, Ready
from broker.records import Dest, Out
from broker.state import BrokerState

T0 = 1000.0  # the fake clock's start
TERMINAL = ("done", "error")


def body_map(out: Out) -> dict[str, Any]:
    """The map of an ``Out``'s message, as the wire would carry it."""
    return out.body.to_map() if isinstance(out.body, Message) else dict(out.body)


@dataclass
class Event:
    """One thing a client saw or did, in the order it happened."""

    kind: str  # accept | msg | gone
    client: bytes
    rid: str
    body: dict[str, Any] | None = None


class Fleet:
    """A BrokerState plus a record of everything it said; fake workers answer by hand."""

    def __init__(self, models: tuple[str, ...] = ("a", "b"), **kwargs: Any) -> None:
        self.clock = FakeClock(T0)
        self.state = BrokerState(self.clock, models=models, **kwargs)
        self.sent: list[Out] = []  # every Out except immediate refusals
        self.refusals: list[tuple[bytes, dict[str, Any]]] = []
        self.timeline: list[Event] = []
        self.keys: dict[tuple[bytes, str], str] = {}  # latest broker key per client request
        self.where: dict[str, bytes] = {}  # broker key -> worker of its latest dispatch

    # -- recording --------------------------------------------------------------------

    def record(self, outs: list[Out]) -> list[Out]:
        self.sent += outs
        for out in outs:
            body = body_map(out)
            if out.to is Dest.CLIENT:
                self.timeline.append(Event("msg", out.identity, body.get("request_id"), body))
            elif isinstance(out.body, Dispatch):
                self.where[out.body.request.request_id] = out.identity
        return outs

    # -- client side ------------------------------------------------------------------------

    def generate(self, client: bytes = b"c1", rid: str = "r1", model: str = "a", **fields: Any) -> list[Out]:
        msg = Generate(request_id=rid, model=model, prompt="hi", **fields)
        outs = self.state.handle_generate(client, msg)
        refusals = [o for o in outs if o.to is Dest.CLIENT]
        if refusals:
            assert len(outs) == 1 and isinstance(outs[0].body, Error)
            self.refusals.append((client, body_map(outs[0])))
            return outs
        self.timeline.append(Event("accept", client, rid))
        self.keys[(client, rid)] = self.state.by_client[(client, rid)]
        return self.record(outs)

    def refusal(self, outs: list[Out]) -> str:
        """The error code of an immediate refusal."""
        assert len(outs) == 1 and outs[0].to is Dest.CLIENT and isinstance(outs[0].body, Error)
        return outs[0].body.code

    def cancel(self, client: bytes = b"c1", rid: str = "r1") -> list[Out]:
        return self.record(self.state.handle_cancel(client, rid))

    def gone(self, client: bytes) -> list[Out]:
        outs = self.record(self.state.client_gone(client))
        self.timeline.append(Event("gone", client, ""))
        return outs

    # -- worker side ---------------------------------------------------------------------------

    def ready(self, wid: str, model: str = "a", capacity: int = 2) -> bytes:
        identity = wid.encode()
        msg = Ready(worker_id=wid, model=model, capacity=capacity, pid=100, host="h")
        self.record(self.state.handle_ready(identity, msg))
        return identity

    def from_worker(self, identity: bytes, msg: Message) -> list[Out]:
        return self.record(self.state.handle_worker_message(identity, msg, raw=msg.to_map()))

    def key(self, client: bytes = b"c1", rid: str = "r1") -> str:
        return self.keys[(client, rid)]

    def worker_of(self, client: bytes = b"c1", rid: str = "r1") -> bytes:
        return self.where[self.key(client, rid)]

    def chunk(self, client: bytes = b"c1", rid: str = "r1", text: str = "x") -> list[Out]:
        key = self.key(client, rid)
        return self.from_worker(self.where[key], Chunk(request_id=key, text=text, token_ids=[7]))

    def done(self, client: bytes = b"c1", rid: str = "r1", finish_reason: str = "stop") -> list[Out]:
        key = self.key(client, rid)
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        return self.from_worker(self.where[key], Done(request_id=key, finish_reason=finish_reason, usage=usage))

    def heartbeat(self, identity: bytes) -> list[Out]:
        return self.from_worker(identity, Heartbeat(worker_id=identity.decode(), in_flight=0, free_slots=1))

    def fail_all(self, message: str = "test over") -> list[Out]:
        return self.record(self.state.fail_all("internal", message))

    def tick(self, advance_s: float = 0.0) -> list[Out]:
        self.clock.advance(advance_s)
        return self.record(self.state.tick())

    # -- views ------------------------------------------------------------------------------------

    def to_client(self, client: bytes = b"c1", rid: str | None = None) -> list[dict[str, Any]]:
        return [e.body for e in self.timeline if e.kind == "msg" and e.client == client and (rid is None or e.rid == rid)]

    def terminal(self, client: bytes = b"c1", rid: str = "r1") -> dict[str, Any]:
        """The one terminal message of a request (asserts there is exactly one)."""
        ends = [m for m in self.to_client(client, rid) if m["type"] in TERMINAL]
        assert len(ends) == 1, ends
        return ends[0]

    def running(self, identity: bytes) -> int:
        return len(self.state.workers[identity].running)

    def queued(self, model: str = "a") -> int:
        return len(self.state.models[model].queue)

    # -- the promise --------------------------------------------------------------------------------

    def check(self, *, complete: bool = True) -> None:
        """Each accepted request gets exactly one terminal message and nothing after it.

        A client that went away may miss its terminal message, but then gets nothing
        more for that request. With ``complete=False`` requests may still be open.
        """
        open_: dict[tuple[bytes, str], int] = {}
        for e in self.timeline:
            if e.kind == "accept":
                assert not open_.get((e.client, e.rid)), f"accepted twice while open: {e}"
                open_[(e.client, e.rid)] = 1
            elif e.kind == "gone":
                for k in [k for k in open_ if k[0] == e.client]:
                    open_[k] = 0
            else:
                assert open_.get((e.client, e.rid)), f"message after the terminal one (or never accepted): {e}"
                assert e.body is not None and e.body["request_id"] == e.rid
                if e.body["type"] in TERMINAL:
                    open_[(e.client, e.rid)] = 0
                else:
                    assert e.body["type"] == "chunk", e.body
        if complete:
            still = [k for k, v in open_.items() if v]
            assert not still, f"requests without a terminal message: {still}"
        for w in self.state.workers.values():
            assert 0 <= len(w.running) <= w.capacity


def worker_outs(outs: list[Out], cls: type[Message] | None = None) -> list[Out]:
    """The ``Out``s addressed to workers (only those of class ``cls`` when given)."""
    return [o for o in outs if o.to is Dest.WORKER and (cls is None or isinstance(o.body, cls))]


def dispatched(outs: list[Out]) -> list[tuple[bytes, str]]:
    """(worker, broker key) of each Dispatch in ``outs``."""
    return [(o.identity, o.body.request.request_id) for o in worker_outs(outs, Dispatch)]
