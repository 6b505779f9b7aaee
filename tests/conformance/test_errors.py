"""Every error code in docs/protocol.md, provoked through the documented protocol.

``COVERED`` maps each code of the document's table to the test that provokes
it; a test reads the table, so a code added to the document without a test
here fails the suite. Codes that cannot be provoked from outside are listed in
``NOT_PROVOKED`` with the reason.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conformance.conftest import IDLE_MODEL, NO_WORKER_TIMEOUT_S, Target
from tests.integration.clients import RawClient, generate, rid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
LONG = 2000  # tokens: far longer than any of these tests waits

COVERED = {
    "bad_request": "test_bad_request",
    "unknown_model": "test_unknown_model",
    "duplicate_request": "test_duplicate_request_belongs_to_the_second_request",
    "overloaded": "test_overloaded",
    "timeout": "test_timeout",
    "cancelled": "test_cancel_ends_in_done_cancelled_not_the_reserved_code",
    "worker_lost": "test_worker_lost_after_output_and_requeue_before_it",
    "unavailable": "test_unavailable_when_a_model_has_no_live_worker",
    "over_budget": "test_over_budget",
}
NOT_PROVOKED = {
    "internal": "a bug in the fleet; nothing a client sends should cause one",
}


def documented_codes() -> set[str]:
    """The codes in docs/protocol.md's 'Error codes' table."""
    text = DOC.read_text()
    table = text[text.index("### Error codes"):]
    table = table[:table.index("\n\n", table.index("|"))]
    return set(re.findall(r"^\| `(\w+)` \|", table, re.M))


def test_every_documented_code_has_a_test_here() -> None:
    codes = documented_codes()
    assert codes == COVERED.keys() | NOT_PROVOKED.keys()
    assert all(name in globals() for name in COVERED.values())


def test_bad_request(wire: RawClient, target: Target) -> None:
    reply = wire.call(generate("bad", target.model, temperature=-1.0))
    assert (reply["type"], reply["code"], reply["request_id"]) == ("error", "bad_request", "bad")
    assert "temperature" in reply["message"]


def test_unknown_model(wire: RawClient, target: Target) -> None:
    reply = wire.call(generate("who", "no-such-model"))
    assert (reply["code"], reply["request_id"]) == ("unknown_model", "who")
    assert "no-such-model" in reply["message"]


def test_duplicate_request_belongs_to_the_second_request(wire: RawClient, target: Target) -> None:
    wire.send(generate("twice", target.model, max_tokens=LONG))
    wire.send(generate("twice", target.model, max_tokens=3))
    refusal = wire.reply_to("twice")
    while refusal["type"] == "chunk":  # the first may already stream
        refusal = wire.reply_to("twice")
    assert (refusal["type"], refusal["code"]) == ("error", "duplicate_request")
    # The first goes on and ends with its own terminal message.
    wire.outcomes["twice"].terminals.clear()
    wire.send({"type": "cancel", "request_id": "twice"})
    end = wire.finish("twice").end
    assert end["type"] == "done" and end["finish_reason"] == "cancelled"
    # Once ended, the id may be used again.
    wire.outcomes.pop("twice")
    assert wire.finish(wire.call(generate("twice", target.model, max_tokens=2))["request_id"]).end["type"] == "done"


def test_overloaded(wire: RawClient, target: Target) -> None:
    """Fill the model's queue until the fleet says `overloaded`, then cancel everything."""
    sent: list[str] = []

    def refusals() -> list[dict]:
        return [o.terminals[0] for o in wire.outcomes.values()
                if o.terminals and o.terminals[0].get("code") == "overloaded"]

    try:
        while len(sent) < 4096 and not refusals():  # past any queue_limit a fleet under test should have
            for _ in range(16):
                sent.append(f"flood-{len(sent)}")
                wire.send(generate(sent[-1], target.model, max_tokens=LONG, priority="background"))
            wire.settle()  # every reply to what was sent so far has been read
        assert refusals(), f"{len(sent)} queued requests and no `overloaded`"
        refusal = refusals()[0]
        assert refusal["request_id"] in sent and "queue" in refusal["message"]
    finally:
        for request_id in sent:
            wire.send({"type": "cancel", "request_id": request_id})
        wire.settle()


def test_timeout(wire: RawClient, target: Target) -> None:
    start_s = time.monotonic()
    end = wire.finish(wire.call(generate("slow", target.model, max_tokens=LONG, timeout_s=0.3))["request_id"]).end
    assert (end["type"], end["code"], end["request_id"]) == ("error", "timeout", "slow")
    assert time.monotonic() - start_s < 30


def test_cancel_ends_in_done_cancelled_not_the_reserved_code(wire: RawClient, target: Target) -> None:
    """`cancelled` is reserved: a cancel ends in `done` with finish_reason `cancelled`."""
    wire.send(generate("stop-me", target.model, max_tokens=LONG))
    wire.reply_to("stop-me", timeout_s=60)  # running: its first chunk came
    wire.send({"type": "cancel", "request_id": "stop-me"})
    end = wire.finish("stop-me").end
    assert end["type"] == "done" and end["finish_reason"] == "cancelled"


def test_unavailable_when_a_model_has_no_live_worker(wire: RawClient, target: Target) -> None:
    target.local("a configured model with no worker")
    wire.send(generate("nobody", IDLE_MODEL))  # queued: the model is served, but by no worker
    end = wire.finish("nobody", timeout_s=30 + NO_WORKER_TIMEOUT_S).end
    assert (end["code"], end["request_id"]) == ("unavailable", "nobody") and "no live worker" in end["message"]


def test_over_budget(wire: RawClient, target: Target) -> None:
    target.local("a fleet with a memory budget that one more replica would exceed")
    reply = wire.call({"type": "load", "request_id": "big", "model": "second", "source": target.model,
                       "replicas": 2})
    assert (reply["type"], reply["code"], reply["request_id"]) == ("error", "over_budget", "big")
    assert "memory_budget_bytes" in reply["message"]


def test_worker_lost_after_output_and_requeue_before_it(expendable: Target) -> None:
    """A worker dies: a stream that had output ends `worker_lost`; a non-streamed request runs again."""
    fleet = expendable.local("it kills a worker")
    wire = RawClient(expendable.addr)
    try:
        requeued_before = wire.call({"type": "status", "request_id": rid()})["status"]["counters"]["requeued"]
        wire.send(generate("streamed", expendable.model, max_tokens=LONG))
        wire.send(generate("whole", expendable.model, max_tokens=200, stream=False, prompt="Once more"))
        wire.reply_to("streamed", timeout_s=60)  # output has started; both are running (capacity 2)
        os.kill(fleet.child(f"worker:{expendable.model}-0").process.pid, signal.SIGKILL)
        lost = wire.finish("streamed", timeout_s=60).end
        assert (lost["type"], lost["code"]) == ("error", "worker_lost")
        whole = wire.finish("whole", timeout_s=150).end  # runs again once the worker is back
        assert whole["type"] == "done" and whole["usage"]["completion_tokens"] > 0 and whole["text"]
        status = wire.call({"type": "status", "request_id": rid()})["status"]
        assert status["counters"]["requeued"] == requeued_before + 1
        assert [len(wire.outcomes[r].terminals) for r in ("streamed", "whole")] == [1, 1]
    finally:
        wire.close()


def test_a_fresh_request_id_is_never_refused_as_a_duplicate(wire: RawClient, target: Target) -> None:
    ids = [rid() for _ in range(4)]
    for request_id in ids:
        wire.send(generate(request_id, target.model, max_tokens=2))
    assert all(wire.finish(r).end["type"] == "done" for r in ids)
