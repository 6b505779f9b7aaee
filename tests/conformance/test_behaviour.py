"""Documented behaviours beyond the error codes: streams, stop strings, cancels, status fields."""

from __future__ import annotations

import pytest

from tests.conformance.conftest import Target
from tests.integration.clients import RawClient, generate, rid
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LONG = 2000


def test_a_stream_adds_up_to_the_whole_answer(wire: RawClient, target: Target) -> None:
    prompt = "Count the boats on the river"
    streamed = wire.finish(wire.call(generate("s", target.model, prompt=prompt, max_tokens=24))["request_id"])
    whole = wire.finish(wire.call(generate("w", target.model, prompt=prompt, max_tokens=24, stream=False))["request_id"])
    s_end, w_end = streamed.end, whole.end
    assert s_end["type"] == w_end["type"] == "done" and not whole.chunks
    assert streamed.text == w_end["text"] and "text" not in s_end
    assert all(c["text"] for c in streamed.chunks[:-1])  # only the last chunk may be empty
    assert [t for c in streamed.chunks for t in c["token_ids"]] == w_end["token_ids"]
    for end in (s_end, w_end):
        assert {"prompt_tokens", "completion_tokens", "cached_tokens"} <= set(end["usage"])
        assert {"queue_s", "ttft_s", "total_s"} <= set(end["timings"])
        assert end["finish_reason"] in ("stop", "length")


def test_a_stop_string_ends_with_finish_reason_stop(wire: RawClient, target: Target) -> None:
    prompt = "Tell me about lamps"
    free = wire.finish(wire.call(generate("free", target.model, prompt=prompt, max_tokens=40, stream=False))
                       ["request_id"]).end
    text = free["text"]
    stop = next((text[i:i + 3] for i in range(len(text) // 3, len(text) - 3) if text[i:i + 3].strip()), None)
    assert stop, f"no stop string to pick from {text!r}"
    stopped = wire.finish(wire.call(generate("stopped", target.model, prompt=prompt, max_tokens=40, stream=False,
                                             stop=[stop]))["request_id"]).end
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == text[:text.index(stop)]  # output ends before the match


def test_a_request_cancelled_while_queued_gets_done_with_no_text(wire: RawClient, target: Target) -> None:
    capacity = wire.first_model()["capacity"]
    fillers = [f"fill-{i}" for i in range(capacity)]
    try:
        for request_id in fillers:
            wire.send(generate(request_id, target.model, max_tokens=LONG))
        for request_id in fillers:
            wire.reply_to(request_id, timeout_s=60)  # every slot is busy
        wire.send(generate("queued", target.model, stream=False))
        wire.send({"type": "cancel", "request_id": "queued"})
        end = wire.finish("queued").end
        assert end["type"] == "done" and end["finish_reason"] == "cancelled"
        assert "text" not in end and "token_ids" not in end
        assert end["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    finally:
        for request_id in fillers:
            wire.send({"type": "cancel", "request_id": request_id})
        wire.settle()


def _model_load(wire: RawClient, model: str) -> tuple[int, int]:
    """(running, queued) of ``model``, from ``status``."""
    row = wire.call({"type": "status", "request_id": rid()})["status"]["models"][model]
    return row["running"], row["queue_depth"]


def test_a_non_streamed_request_cancelled_while_running_gets_its_text_so_far(wire: RawClient, target: Target) -> None:
    wait_for(lambda: _model_load(wire, target.model) == (0, 0), timeout_s=60, what="the model to be idle")
    wire.send(generate("running", target.model, max_tokens=LONG, stream=False))
    wait_for(lambda: _model_load(wire, target.model)[0] == 1, timeout_s=60, what="the request to run")
    wire.send({"type": "cancel", "request_id": "running"})
    end = wire.finish("running").end
    assert end["type"] == "done" and end["finish_reason"] == "cancelled"
    assert isinstance(end.get("text"), str) and len(end["token_ids"]) <= end["usage"]["completion_tokens"]


def _memory(wire: RawClient) -> dict:
    """status.supervisor.memory once the supervisor has reported (it does every second); {} if it never does."""
    def memory() -> dict:
        return wire.call({"type": "status", "request_id": rid()})["status"]["supervisor"].get("memory") or {}

    try:
        return wait_for(memory, timeout_s=10, what="the supervisor's memory figures")
    except AssertionError:
        return {}


def test_a_cancel_of_an_unknown_id_gets_no_reply(wire: RawClient) -> None:
    wire.send({"type": "cancel", "request_id": "never-sent"})
    wire.settle()  # the status reply comes after anything the cancel would have caused
    assert "never-sent" not in wire.outcomes


def test_status_memory_figures(wire: RawClient) -> None:
    memory = _memory(wire)
    if not memory:
        pytest.skip("this fleet reports no memory figures (no supervisor)")
    if memory["budget_bytes"]:
        assert isinstance(memory["loaded_bytes"], int)
    else:
        assert memory["loaded_bytes"] is None  # no budget: no estimate


def test_loaded_bytes_is_null_without_a_budget(expendable: Target) -> None:
    expendable.local("a fleet with no memory budget")
    wire = RawClient(expendable.addr)
    try:
        memory = _memory(wire)
        assert memory["budget_bytes"] == 0 and memory["loaded_bytes"] is None
    finally:
        wire.close()
