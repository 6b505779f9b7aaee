"""Unit tests for the worker's request session and its reply ledger.

A scripted fake engine and a fake clock; no MLX, no sockets, no threads, no monkeypatching.
The session's output goes through a ReplyLedger, as the worker's I/O thread sends it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from actors.clock import FakeClock
from actors.config import BatchingConfig
from actors.protocol import Chunk, Dispatch, Done, Error, Generate, Message
from tests.unit.test_worker_telemetry import RecordingSender
from workers.tools import ToolSupport
from workers.engine.stats import StepStats
from workers.policies import make_auto_tuner, make_policy
from workers.replies import Outgoing, Progress, ReplyLedger
from workers.engine.interface import EngineRequest, StepEvent
from workers.session import WorkerSession
from workers.telemetry import WorkerTelemetry

pytestmark = pytest.mark.timeout(10)

STEP_S = 0.010  # each fake engine step takes this long on the fake clock


class FakeCacheStats:
    def as_dict(self) -> dict[str, Any]:
        return {"prompt_cache_hits": 0}


@dataclass
class Seq:
    req: EngineRequest
    index: int = 0
    made: int = 0
    pending_ids: list[int] = field(default_factory=list)


VOCAB = 1000
BAD_PATTERN = "("  # the fake engine's grammar compiler refuses this regex


class FakeEngine:
    """A scripted engine: token n of a sequence is id 100+n with text ``text_of(n)`` ("" holds it back).

    Each step takes STEP_S on the clock; a sequence ends with ``length`` at max_tokens.
    """

    def __init__(self, clock: FakeClock, capacity: int = 4, text_of: Callable[[int], str] = lambda n: f"w{n} ") -> None:
        self.clock = clock
        self.capacity = capacity
        self.text_of = text_of
        self.seqs: dict[tuple[str, int], Seq] = {}
        self.compiled: list[dict[str, Any]] = []
        self.logprobs_prepared = 0
        self.refuse: str | None = None
        self.stats = StepStats()
        self.cache_stats = FakeCacheStats()
        self.inserted: list[list[str]] = []
        self.admission_batches: list[int] = []
        self.fail_next_step = False
        self.fail_next_insert = False
        self.tool_support = ToolSupport("m", None, "the fake engine has no tool format")
        self.rendered_tools: list[list[dict] | None] = []

    @property
    def active(self) -> int:
        return len(self.seqs)

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.seqs)

    @property
    def vocab_size(self) -> int:
        return VOCAB

    def compile_grammar(self, spec: dict[str, Any]) -> Any:
        self.compiled.append(spec)
        if spec.get("pattern") == BAD_PATTERN:
            raise ValueError("unclosed group")
        return object()

    def prepare_logprobs(self) -> None:
        self.logprobs_prepared += 1

    def controls_refused(self) -> str | None:
        return self.refuse

    def encode_prompt(self, prompt: str | None, messages: list[dict] | None, tokens: list[int] | None,
                      tools: list[dict] | None = None) -> list[int]:
        self.rendered_tools.append(tools)
        ids = list(tokens) if tokens is not None else [ord(c) for c in (prompt or "")]
        if not ids:
            raise ValueError("the prompt is empty after tokenization")
        return ids

    def insert(self, reqs: list[EngineRequest]) -> None:
        if self.fail_next_insert:
            self.fail_next_insert = False
            raise RuntimeError("out of memory")
        assert sum(r.n for r in reqs) <= self.free_slots
        self.inserted.append([r.key for r in reqs])
        for r in reqs:
            for i in range(r.n):
                self.seqs[(r.key, i)] = Seq(r, i)

    def step(self) -> list[StepEvent]:
        self.clock.advance(STEP_S)
        self.stats.record_step(len(self.seqs), STEP_S, solo=False)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("kernel failed")
        events = []
        for (key, index), s in list(self.seqs.items()):
            n = s.made
            s.made += 1
            s.pending_ids.append(100 + n)
            text = self.text_of(n)
            done = s.made >= s.req.max_tokens - index  # completion i ends i tokens sooner
            ids, s.pending_ids = (s.pending_ids, []) if text or done else ([], s.pending_ids)
            asked = s.req.controls is not None and s.req.controls.logprobs
            logprobs = [{"token": "t", "token_id": t, "logprob": -0.5, "bytes": [116]} for t in ids] if asked else None
            events.append(StepEvent(key, text, ids, "length" if done else None, n == 0, s.made if done else 0,
                                    path="batch" if done else "", index=index, logprobs=logprobs or None))
            if done:
                del self.seqs[(key, index)]
        return events

    def remove(self, keys: list[str], reason: str = "cancelled") -> list[StepEvent]:
        out = []
        for (key, index), s in list(self.seqs.items()):
            if key in keys:
                del self.seqs[(key, index)]
                out.append(StepEvent(key, "", [], reason, False, s.made, 3, index=index))
        return out

    def set_admission_batch(self, n: int) -> None:
        self.admission_batches.append(n)

    def close(self) -> None:
        self.seqs.clear()


@dataclass
class Rig:
    """A session, its engine and clock, and a ledger that turns its output into wire messages."""

    session: WorkerSession
    engine: FakeEngine
    clock: FakeClock
    ledger: ReplyLedger
    sender: RecordingSender
    sent: list[Message] = field(default_factory=list)

    def take(self, out: list[Outgoing]) -> list[Message]:
        msgs = self.ledger.take(out)
        self.sent += msgs
        return msgs

    def dispatch(self, rid: str, *, queue_s: float = 0.5, **fields: Any) -> list[Message]:
        msg = Dispatch(request=generate(rid, **fields), queue_s=queue_s)
        now = self.clock.now()
        self.ledger.opened(msg, now)
        return self.take(self.session.dispatch(msg, now))

    def turn(self) -> list[Message]:
        """One loop turn: admit, then step if anything decodes."""
        out = self.session.admit()
        if self.session.stepping:
            out += self.session.step()
        return self.take(out)

    def run(self, turns: int = 50) -> list[Message]:
        out: list[Message] = []
        for _ in range(turns):
            out += self.turn()
            if not self.session.in_flight:
                break
        return out


def generate(rid: str, **fields: Any) -> Generate:
    """A request as the broker dispatches it, under its key ``rid``."""
    return Generate(**{"request_id": rid, "model": "m", "prompt": "hello", "max_tokens": 3, **fields})


def make_rig(policy: str = "immediate", *, capacity: int = 4, max_prompt_tokens: int = 64,
             auto_tune: bool = False, text_of: Callable[[int], str] = lambda n: f"w{n} ",
             compile_pool: Any = None, **batching: Any) -> Rig:
    clock = FakeClock()
    engine = FakeEngine(clock, capacity, text_of)
    cfg = dataclasses.replace(BatchingConfig(decode_window_ms=0.0), policy=policy, decode_capacity=capacity,
                              auto_tune=auto_tune, **batching)
    policy_obj = make_policy(cfg, clock)
    sender = RecordingSender()
    telemetry = WorkerTelemetry(sender, policy_obj, model="m", worker="m-0")
    session = WorkerSession(engine, policy_obj, clock=clock, tuner=make_auto_tuner(cfg, policy_obj),
                            telemetry=telemetry, max_prompt_tokens=max_prompt_tokens, decode_capacity=capacity,
                            compile_pool=compile_pool)
    return Rig(session, engine, clock, ReplyLedger(clock), sender)


def maps(msgs: list[Message], rid: str | None = None) -> list[dict[str, Any]]:
    return [m.to_map() for m in msgs if rid is None or getattr(m, "request_id", None) == rid]


# ---- dispatch ------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"prompt": ""}, "ValueError: the prompt is empty"),  # the tokenizer refuses it
    ({"prompt": "x" * 65}, "prompt has 65 tokens; this worker's limit is 64"),
    ({"prompt": None, "prompt_tokens": list(range(65))}, "prompt has 65 tokens"),
])
def test_a_prompt_the_worker_cannot_take_gets_bad_request_with_its_key(fields: dict[str, Any], message: str) -> None:
    rig = make_rig()
    (err,) = rig.dispatch("b1", **fields)
    assert isinstance(err, Error) and err.code == "bad_request" and err.request_id == "b1"
    assert message in err.message
    assert rig.session.in_flight == 0 and rig.ledger.in_flight == 0


def test_a_dispatch_waits_and_reports_its_prompt_tokens() -> None:
    rig = make_rig(policy="fixed")
    out = rig.session.dispatch(Dispatch(generate("b1", prompt=None, prompt_tokens=[1, 2, 3]), 0.2))
    assert out == [Progress("b1", prompt_tokens=3)]
    assert list(rig.session.waiting) == ["b1"] and rig.engine.active == 0


# ---- admission --------------------------------------------------------------------------


def test_the_window_holds_arrivals_and_wait_s_says_for_how_long() -> None:
    rig = make_rig(policy="fixed", window_ms=2.0, fast_path=False)
    rig.dispatch("b1")
    assert rig.session.wait_s() == pytest.approx(0.002)
    rig.clock.advance(0.001)
    rig.dispatch("b2")
    assert rig.session.admit() == [] and rig.session.wait_s() == pytest.approx(0.001)
    rig.clock.advance(0.001)
    assert rig.session.wait_s() == 0.0
    rig.turn()
    assert rig.engine.inserted == [["b1", "b2"]]
    assert rig.session.wait_s() == 0.0  # decoding: step, do not wait


def test_idle_session_waits_without_limit() -> None:
    rig = make_rig()
    assert rig.session.wait_s() is None and not rig.session.stepping


def test_admission_order_is_priority_then_arrival_within_free_slots() -> None:
    rig = make_rig(policy="fixed", capacity=3, window_ms=1.0, fast_path=False, admission_batch=8)
    for rid, prio in [("b1", "background"), ("b2", "default"), ("b3", "default"), ("b4", "urgent")]:
        rig.dispatch(rid, priority=prio)
        rig.clock.advance(0.0001)
    rig.turn()
    assert rig.engine.inserted == [["b4", "b2", "b3"]]  # three free slots; background waits
    assert list(rig.session.waiting) == ["b1"]


def test_insert_failure_fails_the_chosen_requests_with_internal() -> None:
    rig = make_rig()
    rig.dispatch("b1")
    rig.engine.fail_next_insert = True
    (err,) = rig.turn()
    assert isinstance(err, Error) and err.code == "internal" and "out of memory" in err.message
    assert rig.session.in_flight == 0 and rig.ledger.in_flight == 0


# ---- steps, timings, replies ---------------------------------------------------------


def test_streamed_output_comes_as_chunks_then_done_with_timings_from_broker_acceptance() -> None:
    rig = make_rig()
    rig.dispatch("b1", queue_s=0.5)
    rig.clock.advance(0.1)  # waits here before the loop admits it
    sent = rig.run()
    assert [m["type"] for m in maps(sent)] == ["chunk", "chunk", "chunk", "done"]
    assert [(m["text"], m["token_ids"]) for m in maps(sent)[:3]] == [("w0 ", [100]), ("w1 ", [101]), ("w2 ", [102])]
    done = maps(sent)[-1]
    assert done["finish_reason"] == "length" and "text" not in done
    assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "cached_tokens": 0}
    assert done["timings"].pop("path") == "batch"  # the engine's word on how it decoded it
    assert done["timings"] == pytest.approx({"queue_s": 0.6, "ttft_s": 0.6 + STEP_S, "total_s": 0.6 + 3 * STEP_S})


def test_held_back_ids_wait_for_their_text_and_the_rest_go_out_before_done() -> None:
    rig = make_rig(text_of=lambda n: "" if n in (0, 2) else f"w{n}")
    rig.dispatch("b1")
    sent = maps(rig.run())
    assert [(m["type"], m.get("text"), m.get("token_ids")) for m in sent] == [
        ("chunk", "w1", [100, 101]), ("chunk", "", [102]), ("done", None, None)]


def test_non_streamed_output_is_gathered_into_done() -> None:
    rig = make_rig()
    rig.dispatch("b1", stream=False)
    (done,) = maps(rig.run())
    assert done["type"] == "done" and done["text"] == "w0 w1 w2 " and done["token_ids"] == [100, 101, 102]


def test_step_failure_fails_every_running_request_and_the_session_goes_on() -> None:
    rig = make_rig()
    rig.dispatch("b1")
    rig.dispatch("b2")
    rig.engine.fail_next_step = True
    errs = rig.turn()
    assert [(m["request_id"], m["code"]) for m in maps(errs)] == [("b1", "internal"), ("b2", "internal")]
    assert "kernel failed" in maps(errs)[0]["message"] and rig.engine.active == 0
    rig.dispatch("b3")
    assert maps(rig.run())[-1]["finish_reason"] == "length"
    assert rig.session.steps_completed == 4  # the failed step counts: the loop moved on


# ---- cancel -------------------------------------------------------------------------------


def rig_with_one_request(steps_before: int) -> Rig:
    """A session holding request ``b1`` (10 tokens): still waiting, or after ``steps_before`` steps."""
    rig = make_rig(policy="fixed", window_ms=5.0, fast_path=False)
    rig.dispatch("b1", queue_s=0.0, max_tokens=10)
    if steps_before:
        rig.clock.advance(0.005)
        for _ in range(steps_before):
            rig.turn()
    return rig


@pytest.mark.parametrize("steps_before, completion_tokens, ttft", [
    (0, 0, None),  # waiting: never admitted
    (2, 2, STEP_S),  # decoding: two tokens made
])
def test_session_cancel_ends_with_one_done_and_its_usage(steps_before: int, completion_tokens: int,
                                                         ttft: float | None) -> None:
    rig = rig_with_one_request(steps_before)
    out = rig.session.cancel("b1")
    done = maps(rig.take(out))[-1]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] == completion_tokens and done["usage"]["prompt_tokens"] == 5
    if ttft is not None:
        assert done["timings"]["ttft_s"] == pytest.approx(0.005 + ttft)
    assert rig.session.in_flight == 0 and rig.engine.active == 0


def test_a_cancel_answered_by_the_ledger_ends_the_request_once_and_later_output_is_dropped() -> None:
    rig = make_rig()
    rig.dispatch("b1", queue_s=0.0, max_tokens=10, stream=False)
    rig.turn()
    rig.turn()  # two tokens made and reported
    rig.clock.advance(0.004)  # a cancel arrives in the middle of the next step
    (done,) = maps(rig.ledger.cancel("b1"))
    assert done["finish_reason"] == "cancelled" and done["text"] == "w0 w1 " and done["token_ids"] == [100, 101]
    assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "cached_tokens": 0}
    assert done["timings"]["total_s"] == pytest.approx(2 * STEP_S + 0.004)
    assert rig.ledger.cancel("b1") == []  # a second cancel: nothing more
    # The step in progress ends; its output, and the session's own done at the boundary, are dropped.
    assert rig.turn() == []
    assert rig.take(rig.session.cancel("b1")) == []
    assert rig.session.in_flight == 0 and rig.engine.active == 0 and rig.ledger.in_flight == 0
    rig.dispatch("b1", stream=False)  # forgotten on both sides: a later request may reuse the key
    assert maps(rig.run())[-1]["text"] == "w0 w1 w2 "


def test_a_cancel_before_the_loop_took_the_dispatch_still_answers_at_once() -> None:
    rig = make_rig()
    msg = Dispatch(generate("b1", prompt="hi"), 0.25)
    rig.ledger.opened(msg, rig.clock.now())
    rig.clock.advance(0.01)
    (done,) = maps(rig.ledger.cancel("b1"))
    assert done["usage"]["prompt_tokens"] == 0 and done["timings"]["queue_s"] == pytest.approx(0.26)
    # The loop takes the dispatch, then the cancel: nothing reaches the broker.
    assert rig.take(rig.session.dispatch(msg, rig.clock.now()) + rig.session.cancel("b1")) == []


def test_a_request_finishing_in_the_step_the_cancel_interrupted_still_has_one_terminal() -> None:
    rig = make_rig()
    rig.dispatch("b1", max_tokens=2)
    rig.turn()
    (cancelled,) = maps(rig.ledger.cancel("b1"))
    assert rig.turn() == []  # its last token and done(length) are dropped
    assert cancelled["finish_reason"] == "cancelled"
    assert [m["type"] for m in maps(rig.sent)] == ["chunk"]  # the one chunk before the cancel


# ---- drop, stop, figures, tuning, telemetry ---------------------------------------------------


def test_drop_all_forgets_silently_and_stop_fails_with_unavailable() -> None:
    rig = make_rig(capacity=1)
    rig.dispatch("b1")
    rig.dispatch("b2")
    rig.turn()
    errs = rig.session.stop("worker stopped before this request finished")
    assert [(e.request_id, e.code) for e in errs if isinstance(e, Error)] == [("b2", "unavailable"), ("b1", "unavailable")]
    assert rig.session.in_flight == 0 and rig.engine.active == 0
    rig.dispatch("b3")
    rig.turn()
    rig.session.drop_all()
    assert rig.session.in_flight == 0 and rig.engine.active == 0


def test_stats_report_engine_and_policy_figures() -> None:
    rig = make_rig()
    rig.dispatch("b1")
    rig.run()
    stats = rig.session.stats()
    assert stats["steps"] == 3 and stats["admitted"] == 1 and stats["prompt_cache_hits"] == 0
    assert {"admission_batch", "window_ms", "fast_path_admissions", "busy_s"} <= set(stats)


def test_auto_tune_halves_the_admission_batch_after_a_slow_first_token() -> None:
    rig = make_rig(auto_tune=True, p99_threshold_ms=1.0, auto_tune_min_batch=1, auto_tune_max_batch=8)
    rig.dispatch("b1")
    rig.clock.advance(0.5)  # a TTFT far past twice the target
    rig.run()
    assert rig.engine.admission_batches == [4] and rig.session.policy.admission_batch == 4


def test_each_finished_request_is_one_telemetry_event_and_steps_are_flushed_when_idle() -> None:
    rig = make_rig()
    rig.dispatch("b1", queue_s=0.0)
    rig.run()
    requests = [e for e in rig.sender.events if e["type"] == "request"]
    (ev,) = requests
    assert ev["finish_reason"] == "length" and ev["completion_tokens"] == 3
    assert ev["ttft_s"] == pytest.approx(STEP_S) and ev["e2e_s"] == pytest.approx(3 * STEP_S)
    steps = sum(e["steps"] for e in rig.sender.events if e["type"] == "step")
    assert steps == 3  # the engine went idle: flushed
    before = len(rig.sender.events)
    rig.session.tick()
    assert len(rig.sender.events) == before  # idle upkeep: not yet due
    rig.clock.advance(1.0)
    rig.session.tick()
    assert rig.sender.events[-1]["type"] == "step"


@pytest.mark.parametrize("reason, counted", [
    (None, 1),  # the client asked: a finished request as far as the metrics go
    ("timeout", 0),  # the fleet timed it out: the client never saw it finish
    ("client_gone", 0),
])
@pytest.mark.parametrize("steps_before", [0, 2])
def test_a_cancel_with_a_reason_stays_out_of_the_request_metrics(reason: str | None, counted: int,
                                                                  steps_before: int) -> None:
    rig = rig_with_one_request(steps_before)
    done = maps(rig.take(rig.session.cancel("b1", reason)))[-1]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"  # the broker still frees the slot
    assert len([e for e in rig.sender.events if e["type"] == "request"]) == counted


def test_outputs_for_unknown_requests_pass_through_the_ledger() -> None:
    ledger = ReplyLedger(FakeClock())
    err = Error("internal", "x", "b9")
    assert ledger.take([Progress("b9", "text"), err]) == [err]
    assert ledger.take([Chunk("b9", "t", [1])]) == [Chunk("b9", "t", [1])]
    assert ledger.take([Done("b9", "stop")]) == [Done("b9", "stop")]
