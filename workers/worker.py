"""The worker actor: one process, one thread, owning the MLX context.

The loop reads as ``while running: process_input(); admit(); step()``. It blocks
on the socket only when it has no work. It speaks to the broker over a DEALER
whose identity is the worker id, so a reconnecting worker keeps its name.

The engine keeps a prompt cache (see :mod:`workers.prompt_cache` for how it meets the
broker's ``affinity`` routing); ``done`` reports the reused prompt tokens as
``usage.cached_tokens`` and heartbeats carry its ``prompt_cache_*`` counters.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from actors.config import BatchingConfig
from actors.curve import apply_client, load_client_keys
from actors.metrics import make_event_sender
from actors.protocol import (
    BAD_REQUEST, INTERNAL, PRIORITY_RANK, UNAVAILABLE,
    Cancel, Chunk, Disconnect, Dispatch, Done, Error, Generate, Heartbeat, Message,
    ProtocolError, Ready, decode, encode,
)
from actors.runtime import Hooks, run_process
from actors.sockets import make_socket
from workers.faults import make_fault_injector
from workers.telemetry import WorkerTelemetry

log = logging.getLogger("mlx_fleet.worker")

BROKER_TYPES = frozenset({"dispatch", "cancel", "heartbeat", "disconnect"})


@dataclass(frozen=True)
class WorkerSettings:
    """What one worker process needs; picklable for ``spawn``."""

    worker_id: str
    model: str
    source: str
    connect: str
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 5
    blas: str = "auto"
    dtype: str = "auto"  # auto | quantized | float32 | bfloat16 | float16 (workers/precision.py)
    log_level: str = "INFO"
    max_prompt_tokens: int = 16_384
    metrics_events: str | None = None  # the collector's event endpoint; None sends no metrics
    curve_secret: str = ""  # our secret cert: CurveZMQ to the broker when set
    curve_server_public: str = ""  # the broker's public cert (its secret cert works too)


@dataclass
class Pending:
    """A dispatched request: waiting for admission, then running."""

    key: str
    request: Generate
    prompt_ids: list[int]
    broker_queue_s: float
    arrived_s: float
    admitted_s: float = 0.0
    first_token_s: float = 0.0
    last_token_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # inter-token latencies, for metrics
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    counted: bool = True  # False once the fleet ended it for the client (timeout, client gone): no latency metrics


class WorkerActor:
    """Setup, running, teardown: the three phases of a worker."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.s = settings
        self.running = True
        self.waiting: dict[str, Pending] = {}
        self.active: dict[str, Pending] = {}
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.engine: Any = None
        self.policy: Any = None
        self.tuner: Any = None
        self.info: dict[str, Any] = {}
        self.telemetry = WorkerTelemetry.disabled()
        self.last_heard_s = time.monotonic()
        self.next_beat_s = 0.0
        self.reconnect_wait_s = 0.0  # extra silence before the next reconnect: 0, then 0.5 s doubling to 8 s
        self.faults = make_fault_injector(settings.worker_id, lambda: self.running)

    # ---- setup ------------------------------------------------------------------

    def setup(self) -> None:
        """Choose a BLAS, import MLX, load the model, connect and say ready."""
        from workers.blas import describe_blas, find_blas, preload_blas

        # Connect to the collector first: by the time the model is loaded, the first event gets through.
        # (Held by a still-disabled telemetry so teardown closes it even if loading fails.)
        sender = make_event_sender(self.s.metrics_events, f"worker:{self.s.worker_id}", ctx=self.ctx)
        self.telemetry = WorkerTelemetry(sender, None, model=self.s.model, worker=self.s.worker_id)

        preload_blas(find_blas(self.s.blas))
        from actors.clock import MonotonicClock
        from workers import engine as engine_mod
        from workers.models import resolve_source
        from workers.policies import AutoTuner, make_policy
        from workers.precision import describe_precision

        path = resolve_source(self.s.source, self.s.dtype)
        t0 = time.perf_counter()
        model, tokenizer = engine_mod.load_model(str(path), self.s.dtype)
        b = self.s.batching
        self.engine = engine_mod.Engine(
            model, tokenizer, decode_capacity=b.decode_capacity,
            admission_batch=b.admission_batch, prefill_step_size=b.prefill_step_size,
            prompt_cache_entries=b.prompt_cache_entries, prompt_cache_bytes=b.prompt_cache_bytes,
            solo_fast_path=b.solo_fast_path,
        )
        self.policy = make_policy(b, MonotonicClock())
        self.tuner = AutoTuner(b, self.policy) if b.auto_tune else None
        self.telemetry = WorkerTelemetry(sender, self.policy, model=self.s.model, worker=self.s.worker_id)
        self.info = {"blas": describe_blas(), **engine_mod.mlx_info(), "source": self.s.source, "dtype": self.s.dtype,
                     "precision": describe_precision(model),
                     "policy": b.policy, "window_ms": b.window_ms, "fast_path": b.fast_path,
                     "admission_batch": b.admission_batch,
                     "prompt_cache_max_entries": b.prompt_cache_entries, "prompt_cache_max_bytes": b.prompt_cache_bytes,
                     "solo_fast_path": self.engine.solo_fast_path}
        log.info("loaded %s from %s in %.2fs; precision=%s; blas=%s", self.s.model, path, time.perf_counter() - t0,
                 self.info["precision"], self.info["blas"])
        self.connect()

    def connect(self) -> None:
        """(Re)connect the DEALER and announce ``ready``."""
        if self.sock is not None:
            self.sock.close(0)
        self.sock = make_socket(self.ctx, zmq.DEALER, identity=self.s.worker_id.encode())
        if self.s.curve_secret:
            apply_client(self.sock, load_client_keys(self.s.curve_secret, self.s.curve_server_public))
        self.sock.connect(self.s.connect)
        self.send_ready()

    def send_ready(self) -> None:
        """Announce this worker and its decode capacity."""
        self.send(Ready(self.s.worker_id, self.s.model, self.s.batching.decode_capacity,
                        os.getpid(), socket.gethostname(), self.info))
        self.last_heard_s = time.monotonic()

    def send(self, msg: Message) -> None:
        """Send without blocking; a full pipe means the broker is gone (dropped)."""
        assert self.sock is not None
        try:
            self.sock.send_multipart(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("broker not reading; dropped %s", msg.TYPE)

    # ---- running ------------------------------------------------------------------

    def run(self) -> None:
        """The busy loop: blocks on input only when idle."""
        while self.running:
            self.process_input()
            self.admit()
            self.step()
            self.keepalive()

    def _poll_timeout_ms(self) -> float:
        if self.engine.active:
            return 0.0
        if self.waiting:
            d = self.policy.decide(waiting=len(self.waiting), running=0, free_slots=self.engine.free_slots,
                                   first_arrival_s=self._first_arrival(), urgent_waiting=self._urgent())
            if d.admit:
                return 0.0
            if d.wait_s is not None:
                return max(0.0, d.wait_s * 1000.0)
        return max(0.0, (self.next_beat_s - time.monotonic()) * 1000.0)

    def process_input(self) -> None:
        """Handle every message ready now; wait for one when there is no work."""
        assert self.sock is not None
        timeout_ms = self._poll_timeout_ms()
        if timeout_ms > 0 and not self.sock.poll(timeout_ms):
            return
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            self.heard()
            try:
                msg = decode(frames, allowed=BROKER_TYPES)
            except ProtocolError as exc:
                log.warning("dropped malformed broker message: %s", exc.message)
                continue
            if isinstance(msg, Dispatch):
                self.handle_dispatch(msg)
            elif isinstance(msg, Cancel):
                self.handle_cancel(msg.request_id, msg.reason)
            elif isinstance(msg, Disconnect):
                self.handle_disconnect(msg.reason)

    def handle_dispatch(self, msg: Dispatch) -> None:
        """Validate and tokenize a request; it then waits for admission."""
        now = time.monotonic()
        req = msg.request  # decoded and checked with the dispatch; its request_id is the broker's key
        key = req.request_id
        try:
            ids = self.engine.encode_prompt(req.prompt, req.messages, req.prompt_tokens)
            if len(ids) > self.s.max_prompt_tokens:
                raise ValueError(f"prompt has {len(ids)} tokens; this worker's limit is {self.s.max_prompt_tokens}")
        except Exception as exc:  # tokenizer or template failures are the request's fault
            self.send(Error(BAD_REQUEST, f"{type(exc).__name__}: {exc}", key))
            return
        self.waiting[key] = Pending(key, req, ids, msg.queue_s, now)
        if self.faults is not None:
            self.faults.on_dispatch()

    def handle_cancel(self, key: str, reason: str | None = None) -> None:
        """Cancel: drop it if waiting, else free its slot at this step.

        With a ``reason`` the fleet, not the client, ended it: the client gets no
        ``done``, so the request stays out of the latency histograms.
        """
        waiting = self.waiting.pop(key, None)
        pending = waiting or self.active.get(key)
        if pending is not None and reason:
            pending.counted = False
        if waiting is not None:
            self.finish(waiting, "cancelled", 0)
            return
        for event in self.engine.remove([key], "cancelled"):
            self.emit(event)

    def handle_disconnect(self, reason: str) -> None:
        """The broker forgot us (it restarted or declared us dead): drop work, re-register."""
        log.warning("broker asked us to re-register (%s); dropping %d requests", reason, len(self.waiting) + len(self.active))
        self.drop_all()
        self.send_ready()

    def drop_all(self) -> None:
        """Forget every request (the broker no longer knows them)."""
        self.engine.remove(list(self.active))
        self.waiting.clear()
        self.active.clear()

    def _first_arrival(self) -> float | None:
        return min((p.arrived_s for p in self.waiting.values()), default=None)

    def _urgent(self) -> bool:
        return any(p.request.priority == "urgent" for p in self.waiting.values())

    def admit(self) -> None:
        """Ask the policy how many waiting requests join the batch now."""
        if not self.waiting:
            return
        d = self.policy.decide(waiting=len(self.waiting), running=self.engine.active,
                               free_slots=self.engine.free_slots, first_arrival_s=self._first_arrival(),
                               urgent_waiting=self._urgent())
        if d.admit <= 0:
            return
        from workers.engine import EngineRequest

        chosen = sorted(self.waiting.values(), key=lambda p: (PRIORITY_RANK[p.request.priority], p.arrived_s))[: d.admit]
        now = time.monotonic()
        self.telemetry.on_admit(now - min(p.arrived_s for p in chosen), now)
        reqs = []
        for p in chosen:
            del self.waiting[p.key]
            p.admitted_s = now
            self.active[p.key] = p
            r = p.request
            reqs.append(EngineRequest(p.key, p.prompt_ids, r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed,
                                      list(r.stop or []), cache=r.cache))
        try:
            self.engine.insert(reqs)
        except Exception as exc:
            log.exception("insert failed")
            for p in chosen:
                self.active.pop(p.key, None)
                self.send(Error(INTERNAL, f"engine insert failed: {exc}", p.key))

    def step(self) -> None:
        """One engine step; chunks out, at most one per request."""
        if not self.engine.active:
            return
        try:
            events = self.engine.step()
        except Exception as exc:
            # The engine's state is unknown now: fail everything it held, keep serving.
            log.exception("engine step failed")
            for key in list(self.active):
                self.send(Error(INTERNAL, f"engine step failed: {type(exc).__name__}: {exc}", key))
            self.engine.remove(list(self.active))
            self.active.clear()
            return
        now = time.monotonic()
        for event in events:
            self.emit(event, now)
        self.telemetry.on_step(self.engine.stats, now)
        if not self.engine.active:
            self.telemetry.flush(now)

    def emit(self, event: Any, token_s: float | None = None) -> None:
        """Turn one engine event into a chunk and/or the terminal done.

        ``token_s`` is when a step produced the event's token; None for events
        that carry no new token (a cancellation).
        """
        p = self.active.get(event.key)
        if p is None:
            return
        if token_s is not None:
            if p.last_token_s:
                p.itl_s.append(token_s - p.last_token_s)
            p.last_token_s = token_s
        if event.first_token and not p.first_token_s:
            p.first_token_s = token_s or time.monotonic()
        p.token_ids.extend(event.token_ids)
        if p.request.stream:
            # Text may be held back (a partial character, a stop-string prefix); ids wait with it.
            if event.text or (event.finish_reason is not None and p.token_ids):
                self.send(Chunk(p.key, event.text, p.token_ids))
                p.token_ids = []
        else:
            p.text.append(event.text)
        if event.finish_reason is not None:
            del self.active[p.key]
            self.finish(p, event.finish_reason, event.completion_tokens, event.cached_tokens, event.path)

    def finish(self, p: Pending, reason: str, completion_tokens: int, cached_tokens: int = 0, path: str = "") -> None:
        """Send ``done`` with usage and timings (measured from broker acceptance; ``path``: solo | batch | handoff)."""
        now = time.monotonic()
        base = p.broker_queue_s - p.arrived_s
        admitted = p.admitted_s or now
        timings: dict[str, Any] = {"queue_s": base + admitted, "ttft_s": base + (p.first_token_s or now), "total_s": base + now}
        if path:
            timings["path"] = path
        usage = {"prompt_tokens": len(p.prompt_ids), "completion_tokens": completion_tokens, "cached_tokens": cached_tokens}
        done = Done(p.key, reason, usage, timings)
        if p.counted:
            self.telemetry.on_request(
                finish_reason=reason, prompt_tokens=usage["prompt_tokens"], completion_tokens=completion_tokens,
                queue_s=timings["queue_s"] if p.admitted_s else None,
                ttft_s=timings["ttft_s"] if p.first_token_s else None, e2e_s=timings["total_s"], itl_s=p.itl_s)
        if not p.request.stream:
            done.text = "".join(p.text)
            done.token_ids = p.token_ids
        if self.tuner is not None and p.first_token_s:
            self.tuner.observe_batch([p.first_token_s - p.arrived_s])
            self.engine.set_admission_batch(self.policy.admission_batch)
        self.send(done)

    def keepalive(self) -> None:
        """Heartbeat the broker; re-register with backoff when it has gone quiet."""
        now = time.monotonic()
        if now < self.next_beat_s:
            return
        self.next_beat_s = now + self.s.heartbeat_interval_s
        if self.sock is not None and self.sock.poll(0):
            # A long engine step kept us from reading: what waits in the pipe proves the broker is alive.
            self.heard()
        silent_s = now - self.last_heard_s
        if silent_s > self.s.heartbeat_interval_s * self.s.heartbeat_liveness + self.reconnect_wait_s:
            self.reconnect_wait_s = min(max(0.5, self.reconnect_wait_s * 2), 8.0)
            log.warning("broker silent %.1fs; reconnecting (next try %.1fs later)", silent_s, self.reconnect_wait_s)
            self.drop_all()
            self.connect()  # resets last_heard_s: the silence is counted again from here
            return
        self.telemetry.flush(now)  # keeps the admission gauges fresh while idle
        self.send(Heartbeat(self.s.worker_id, len(self.active) + len(self.waiting), self.engine.free_slots, self.stats()))

    def heard(self) -> None:
        """Any message from the broker: it is alive, so the reconnect backoff starts over."""
        self.last_heard_s = time.monotonic()
        self.reconnect_wait_s = 0.0

    def stats(self) -> dict[str, Any]:
        """Engine and policy figures, reported with each heartbeat."""
        p = self.policy.stats
        return {**self.engine.stats.as_dict(), "fast_path_admissions": p.fast_path_admissions,
                "admitted": p.admitted, "window_waits": p.window_waits,
                "admission_batch": self.policy.admission_batch, "window_ms": self.policy.window_ms,
                **self.engine.cache_stats.as_dict()}

    # ---- teardown -------------------------------------------------------------------

    def teardown(self) -> None:
        """Fail what is still held, say goodbye, close."""
        if self.sock is not None:
            for key in list(self.waiting) + list(self.active):
                self.send(Error(UNAVAILABLE, "worker stopped before this request finished", key))
            self.send(Disconnect(self.s.worker_id, "worker stopping"))
            self.sock.close(0)
        self.telemetry.close(time.monotonic())
        if self.engine is not None:
            self.engine.close()
        self.ctx.term()


def run_worker(settings: WorkerSettings) -> None:
    """Process entry point (spawned by the supervisor, or `mlx-fleet worker`)."""

    def hooks() -> Hooks:
        actor = WorkerActor(settings)
        return Hooks(start=actor.setup, loop=actor.run, stop=actor.teardown,
                     request_stop=lambda: setattr(actor, "running", False))

    run_process(f"worker:{settings.worker_id}", settings.log_level, hooks)
