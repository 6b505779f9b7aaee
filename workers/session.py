"""The worker's request session: what a worker does with its requests, apart from moving bytes.

Pure: no MLX, no sockets. It takes a clock and an engine (anything shaped like
:class:`workers.engine.interface.EngineLike`), and each call returns
what to send. The worker's MLX thread drives it:

``dispatch`` / ``cancel`` as messages arrive, then ``admit`` and ``step`` in turn,
blocking for input for at most ``wait_s()`` when there is nothing to step.

It keeps the requests in flight (waiting for admission, then decoding), asks the
batching policy (:mod:`workers.policies`) when to admit, feeds the auto-tuner,
measures each request's timings (from broker acceptance) and reports telemetry.

Its output is wire messages (``done``, ``error``) and :class:`workers.replies.Progress`
records, which the I/O thread's :class:`workers.replies.ReplyLedger` turns into
``chunk`` messages and completes the ``done`` of non-streamed requests with their text.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.clock import Clock
from actors.protocol import (
    BAD_REQUEST, INTERNAL, PRIORITY_RANK, UNAVAILABLE,
    Dispatch, Done, Error, Generate,
)
from workers.decoding import RefusedField, check_request, make_controls, needs_compile_pool
from workers.engine.stats import StepStats
from workers.policies import AdmissionPolicy, AutoTuner, Decision
from workers.replies import Outgoing, Progress, request_timings
from workers.engine.interface import Controls, EngineLike, EngineRequest, StepEvent
from workers.telemetry import WorkerTelemetry
from workers.tool_session import RequestTools
from workers.tools import ToolPlan, ToolRequestError

log = logging.getLogger("mlx_fleet.worker")


@dataclass
class HeldRequest:
    """A request held by the session: waiting for admission, then decoding."""

    key: str
    request: Generate
    prompt_ids: list[int]
    base_s: float  # broker queue time minus arrival here: adds to clock times to measure from acceptance
    arrived_s: float
    admitted_s: float = 0.0
    first_token_s: float = 0.0
    last_token_s: float = 0.0
    tokens: int = 0  # generated so far (EOS included)
    itl_s: list[float] = field(default_factory=list)  # inter-token latencies, for metrics
    counted: bool = True  # False once the fleet ended it for the client (timeout, client gone): no latency metrics
    controls: Controls | None = None
    ended: dict[int, tuple[str, int]] = field(default_factory=dict)  # completion index -> (finish reason, tokens)
    cached_tokens: int = 0
    path: str = ""  # completion 0's engine path
    tools: RequestTools = field(default_factory=lambda: RequestTools(ToolPlan()))  # workers/tool_session.py

    @property
    def n(self) -> int:
        """Completions asked for: sequences it takes in the engine."""
        return self.request.n

    def progress(self, text: str = "", token_ids: list[int] | None = None, index: int = 0,
                 logprobs: list[dict[str, Any]] | None = None,
                 tool_calls: list[dict[str, Any]] | None = None) -> Progress:
        """This request's figures now, with new output (of completion ``index``)."""
        return Progress(self.key, text, token_ids or [], len(self.prompt_ids), self.tokens,
                        self.admitted_s, self.first_token_s, index, logprobs, tool_calls or None)


class WorkerSession:
    """The requests of one worker: admission, steps, cancels, timings; returns what to send."""

    def __init__(
        self,
        engine: EngineLike,
        policy: AdmissionPolicy,
        *,
        clock: Clock,
        tuner: AutoTuner | None = None,
        telemetry: WorkerTelemetry | None = None,
        max_prompt_tokens: int = 16_384,
        idle_flush_s: float = 1.0,
        decode_capacity: int = 16,
        compile_pool: Executor | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.clock = clock
        self.tuner = tuner
        self.telemetry = telemetry or WorkerTelemetry.disabled()
        self.max_prompt_tokens = max_prompt_tokens
        self.idle_flush_s = idle_flush_s
        self.decode_capacity = decode_capacity
        self.compile_pool = compile_pool  # None: controls are prepared inline (tests)
        self.wake = wake or (lambda: None)  # rings the loop when a compile finishes
        self.preparing: dict[str, tuple[HeldRequest, Future[Controls | None]]] = {}  # grammars compiling
        self.waiting: dict[str, HeldRequest] = {}
        self.active: dict[str, HeldRequest] = {}
        self.steps_completed = 0
        self._flushed_s = clock.now()

    # ---- input ------------------------------------------------------------------

    def dispatch(self, msg: Dispatch, arrived_s: float | None = None) -> list[Outgoing]:
        """Tokenize a request (decoded and checked with its dispatch); it then waits for admission.

        ``arrived_s`` is when the worker received it (default: now).
        """
        now = self.clock.now() if arrived_s is None else arrived_s
        req = msg.request
        key = req.request_id  # the broker's own key
        try:
            check_request(req, vocab_size=self.engine.vocab_size, decode_capacity=self.decode_capacity,
                          refused=self.engine.controls_refused())
            tools = RequestTools.for_request(req, self.engine.tool_support)
            if tools.plan.grammar is not None:  # the tool grammar replaces the request's own (workers/tools.py)
                req = dataclasses.replace(req, grammar=tools.plan.grammar)
            ids = self.engine.encode_prompt(req.prompt, req.messages, req.prompt_tokens, tools.plan.template_tools)
            if len(ids) > self.max_prompt_tokens:
                raise ValueError(f"prompt has {len(ids)} tokens; this worker's limit is {self.max_prompt_tokens}")
        except RefusedField as exc:
            return [Error(BAD_REQUEST, str(exc), key)]
        except ToolRequestError as exc:
            return [Error(BAD_REQUEST, f"generate: {exc.field}: {exc}", key)]
        except Exception as exc:  # tokenizer or template failures are the request's fault
            return [Error(BAD_REQUEST, f"{type(exc).__name__}: {exc}", key)]
        pending = HeldRequest(key, req, ids, msg.queue_s - now, now, tools=tools)
        if self.compile_pool is not None and needs_compile_pool(req):
            future = self.compile_pool.submit(self._prepare, req)
            self.preparing[key] = (pending, future)
            future.add_done_callback(lambda _: self.wake())
            return [pending.progress()]
        try:
            pending.controls = self._prepare(req)
        except RefusedField as exc:
            return [Error(BAD_REQUEST, str(exc), key)]
        self.waiting[key] = pending
        return [pending.progress()]

    def _prepare(self, req: Generate) -> Controls | None:
        """The request's controls: its grammar compiled, what logprobs need built (maybe on a pool thread)."""
        if req.logprobs:
            self.engine.prepare_logprobs()
        return make_controls(req, self.engine.compile_grammar)

    def _prepared(self) -> list[Outgoing]:
        """Requests whose controls are ready go to the waiting list; a grammar that failed is refused."""
        out: list[Outgoing] = []
        for key, (pending, future) in list(self.preparing.items()):
            if not future.done():
                continue
            del self.preparing[key]
            try:
                pending.controls = future.result()
            except RefusedField as exc:
                out.append(Error(BAD_REQUEST, str(exc), key))
                continue
            except Exception as exc:  # a compiler crash is the request's failure, not the worker's
                log.exception("preparing %s failed", key)
                out.append(Error(INTERNAL, f"preparing the request failed: {type(exc).__name__}: {exc}", key))
                continue
            self.waiting[key] = pending
        return out

    def cancel(self, key: str, reason: str | None = None) -> list[Outgoing]:
        """End a request now: dropped if waiting, removed from the batch if decoding.

        A ``reason`` (the fleet timed it out, or its client went away) keeps the request
        out of the latency metrics: the client never saw it finish.
        """
        pending = self.waiting.pop(key, None)
        if pending is None and key in self.preparing:
            pending = self.preparing.pop(key)[0]
        held = pending or self.active.get(key)
        if held is not None and reason:
            held.counted = False
        if pending is not None:
            return self._finish(pending, "cancelled", 0)
        out: list[Outgoing] = []
        for event in self.engine.remove([key], "cancelled"):
            out += self._on_event(event, None)
        return out

    def drop_all(self) -> None:
        """Forget every request without a reply (the broker no longer knows them)."""
        if self.active:
            self.engine.remove(list(self.active))
        self.preparing.clear()
        self.waiting.clear()
        self.active.clear()

    def stop(self, message: str) -> list[Outgoing]:
        """Fail every request held with ``unavailable`` and forget them (the worker is stopping)."""
        out: list[Outgoing] = [Error(UNAVAILABLE, message, key) for key in [*self.preparing, *self.waiting, *self.active]]
        self.drop_all()
        return out

    # ---- running ----------------------------------------------------------------

    @property
    def stepping(self) -> bool:
        """True while sequences are decoding: the loop should step, not wait."""
        return self.engine.active > 0

    def wait_s(self) -> float | None:
        """How long the loop may wait for input: 0 when there is work now, None when idle."""
        if self.engine.active or any(f.done() for _, f in self.preparing.values()):
            return 0.0
        if self.waiting:
            d = self._decide(running=0)
            if d.admit:
                return 0.0
            if d.wait_s is not None:
                return max(0.0, d.wait_s)
        return None

    def admit(self) -> list[Outgoing]:
        """Admit as many waiting requests as the policy says, in priority then arrival order.

        A request with ``n`` completions takes ``n`` of the engine's free slots; one that
        does not fit waits, and so do those behind it (no overtaking).
        """
        out = self._prepared() if self.preparing else []
        if not self.waiting:
            return out
        d = self._decide(running=self.engine.active)
        if d.admit <= 0:
            return out
        ordered = sorted(self.waiting.values(), key=lambda p: (PRIORITY_RANK[p.request.priority], p.arrived_s))
        chosen: list[HeldRequest] = []
        slots = self.engine.free_slots
        for p in ordered[: d.admit]:
            if p.n > slots:
                break
            chosen.append(p)
            slots -= p.n
        if not chosen:
            return out
        now = self.clock.now()
        self.telemetry.on_admit(now - min(p.arrived_s for p in chosen), now)
        reqs = []
        for p in chosen:
            del self.waiting[p.key]
            p.admitted_s = now
            self.active[p.key] = p
            r = p.request
            reqs.append(EngineRequest(p.key, p.prompt_ids, r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed,
                                      p.tools.stop(r.stop), cache=r.cache, n=r.n, controls=p.controls))
        try:
            self.engine.insert(reqs)
        except Exception as exc:
            log.exception("insert failed")
            for p in chosen:
                self.active.pop(p.key, None)
            return out + [Error(INTERNAL, f"engine insert failed: {exc}", p.key) for p in chosen]
        return out + [p.progress() for p in chosen]

    def step(self) -> list[Outgoing]:
        """One engine step: each request's new output, and the done of those that finished."""
        if not self.engine.active:
            return []
        try:
            events = self.engine.step()
        except Exception as exc:
            # The engine's state is unknown now: fail everything it held, keep serving.
            log.exception("engine step failed")
            out: list[Outgoing] = [Error(INTERNAL, f"engine step failed: {type(exc).__name__}: {exc}", key)
                                   for key in self.active]
            self.engine.remove(list(self.active))
            self.active.clear()
            return out
        finally:
            self.steps_completed += 1
        now = self.clock.now()
        out = []
        for event in events:
            out += self._on_event(event, now)
        self.telemetry.on_step(self.engine.stats, now)
        if not self.engine.active:
            self._flush(now)
        return out

    def tick(self) -> None:
        """Idle upkeep: keep the admission gauges fresh (one telemetry flush per ``idle_flush_s``)."""
        now = self.clock.now()
        if now - self._flushed_s >= self.idle_flush_s:
            self._flush(now)

    # ---- figures ----------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests held: waiting and decoding."""
        return len(self.preparing) + len(self.waiting) + len(self.active)

    def stats(self) -> dict[str, Any]:
        """Engine and policy figures, reported with heartbeats."""
        p = self.policy.stats
        return {**self.engine.stats.as_dict(), "fast_path_admissions": p.fast_path_admissions,
                "admitted": p.admitted, "window_waits": p.window_waits,
                "admission_batch": self.policy.admission_batch, "window_ms": self.policy.window_ms,
                **self.engine.cache_stats.as_dict()}

    # ---- internals --------------------------------------------------------------

    def _decide(self, *, running: int) -> Decision:
        return self.policy.decide(
            waiting=len(self.waiting), running=running, free_slots=self.engine.free_slots,
            first_arrival_s=min(p.arrived_s for p in self.waiting.values()),
            urgent_waiting=any(p.request.priority == "urgent" for p in self.waiting.values()))

    def _on_event(self, event: StepEvent, token_s: float | None) -> list[Outgoing]:
        """One engine event: its Progress, and the done when it is the last.

        ``token_s`` is when a step produced the event's token; None for an event
        that carries no new token (a removal).
        """
        p = self.active.get(event.key)
        if p is None:
            return []
        if token_s is not None:
            if p.last_token_s and event.index == 0:  # one completion's pace (all n step together)
                p.itl_s.append(token_s - p.last_token_s)
            if event.index == 0:
                p.last_token_s = token_s
            p.tokens += 1
        if event.first_token and not p.first_token_s:
            p.first_token_s = token_s or self.clock.now()
        if event.finish_reason is None:
            seen = p.tools.output(event.text, event.index)  # content and tool-call deltas (workers/tool_session.py)
            return [p.progress(seen.content, event.token_ids, event.index, event.logprobs, seen.deltas)]
        end = p.tools.end(event.text, event.finish_reason, event.index)
        out: list[Outgoing] = [p.progress(end.content, event.token_ids, event.index, event.logprobs, end.deltas)]
        p.ended[event.index] = (end.finish_reason, event.completion_tokens)
        if event.index == 0:
            p.cached_tokens, p.path = event.cached_tokens, event.path
        if len(p.ended) == p.n:
            del self.active[p.key]
            reason, tokens = p.ended[0]
            out += self._finish(p, reason, sum(t for _, t in p.ended.values()), p.cached_tokens, p.path)
        return out

    def _finish(self, p: HeldRequest, reason: str, completion_tokens: int, cached_tokens: int = 0,
                path: str = "") -> list[Outgoing]:
        """The request's ``done``: usage and timings, with the engine ``path`` it took when known
        (solo | batch | handoff), and with n > 1 each completion's end; with tool calls, those
        (workers/tool_session.py); the reply ledger adds the text."""
        now = self.clock.now()
        timings: dict[str, Any] = request_timings(p.base_s, p.admitted_s, p.first_token_s, now)
        if path:
            timings["path"] = path
        usage = {"prompt_tokens": len(p.prompt_ids), "completion_tokens": completion_tokens,
                 "cached_tokens": cached_tokens}
        if p.counted:
            self.telemetry.on_request(
                finish_reason=reason, prompt_tokens=usage["prompt_tokens"], completion_tokens=completion_tokens,
                queue_s=timings["queue_s"] if p.admitted_s else None,
                ttft_s=timings["ttft_s"] if p.first_token_s else None, e2e_s=timings["total_s"], itl_s=p.itl_s)
        if self.tuner is not None and p.first_token_s:
            self.tuner.observe_batch([p.first_token_s - p.arrived_s])
            self.engine.set_admission_batch(self.policy.admission_batch)
        done = Done(p.key, reason, usage, timings, warning=p.tools.warning)
        if p.n > 1:
            done.choices = [{"index": i, "finish_reason": p.ended.get(i, (reason, 0))[0],
                             "completion_tokens": p.ended.get(i, (reason, 0))[1],
                             **({"tool_calls": p.tools.calls(i)} if p.tools.calls(i) else {})} for i in range(p.n)]
        else:
            done.tool_calls = p.tools.calls(0)
        return [done]

    def _flush(self, now: float) -> None:
        self.telemetry.flush(now)
        self._flushed_s = now
