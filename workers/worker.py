"""The worker actor: one process, two threads.

- The MLX thread (the process's main thread) loads the model and runs the actor loop,
  which reads as ``while running: take input; admit; report; step``. It is the only
  thread that calls MLX. Its decisions live in the pure :class:`workers.session.WorkerSession`.
- The I/O thread (:class:`workers.io_thread.BrokerIO`) owns the DEALER to the broker:
  heartbeats, reading, answering cancels, encoding and sending, reconnecting.

They share no mutable state: the I/O thread hands the loop dispatches, cancels and
resets through the loop's inbox, and the loop hands back one report per turn through the
outbox (see :mod:`workers.link`), then rings an ``inproc://`` doorbell. The loop blocks on
its inbox only when it has nothing to step, and wakes as soon as something arrives.

The engine keeps a prompt cache (see :mod:`workers.engine.prompt_cache` for how it meets the
broker's routing); ``done`` reports the reused prompt tokens as ``usage.cached_tokens``,
heartbeats carry its ``prompt_cache_*`` counters, and each report to the I/O thread lists its
entries when they changed, which the I/O thread turns into ``prefixes`` for the broker. The
decode capacity is sized once the model is loaded (:mod:`workers.capacity`) and advertised in
``ready``, with how it was sized in ``ready.info["capacity"]``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
import os
import queue
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from actors.clock import MonotonicClock
from actors.config import BatchingConfig
from actors.curve import load_client_keys
from actors.metrics import make_event_sender
from actors.protocol import Cancel, Disconnect, Dispatch, Ready
from actors.runtime import Hooks, StartError, run_process
from actors.shard_group import ShardRank
from workers.engine.interface import EngineLike
from workers.faults import make_fault_injector
from workers.io_thread import BrokerIO
from workers.link import Close, InboxItem, Inbound, LoopReport, Register, Reset, Stop, Wake
from workers.replies import Outgoing
from workers.session import WorkerSession
from workers.telemetry import WorkerTelemetry

log = logging.getLogger("mlx_fleet.worker")

IO_JOIN_S = 2.0  # how long close() waits for the I/O thread to send the goodbye and close
COMPILE_THREADS = 2  # grammars compile here, off the MLX thread (llguidance drops the GIL while it works)
_DOORBELLS = itertools.count()


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
    dtype: str = "auto"  # auto | quantized | float32 | bfloat16 | float16 (workers/models/precision.py)
    log_level: str = "INFO"
    max_prompt_tokens: int = 16_384
    metrics_events: str | None = None  # the collector's event endpoint; None sends no metrics
    curve_secret: str = ""  # our secret cert: CurveZMQ to the broker when set
    curve_server_public: str = ""  # the broker's public cert (its secret cert works too)
    shard: ShardRank | None = None  # this process's rank when the model is sharded over a group (workers/shard/engine.py)
    recovery_grace_s: float = 10.0  # how long requests outlive a lost broker
    recovery_buffer_bytes: int = 64 * 1024 * 1024  # output kept for a new broker; past it while away: worker_lost
    chat_template: str = ""  # a Jinja file or a shipped template's name replacing the tokenizer's (workers/engine/tool_setup.py)
    tool_format: str = ""  # the tool-call format (an mlx-lm tool parser, or none); "": the tokenizer's own
    memory_share: int = 1  # worker processes of the fleet on this machine: "auto" capacity divides the memory, the BLAS the cores


class WorkerActor:
    """start, run, close: the three phases of a worker, on its MLX thread."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.s = settings
        self.running = True
        self.clock = MonotonicClock()
        self.ctx = zmq.Context()
        self.inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[LoopReport | Close] = queue.SimpleQueue()
        self.session: WorkerSession | None = None
        self.engine: EngineLike | None = None
        self.io: BrokerIO | None = None
        self.bell: zmq.SyncSocket | None = None
        self.info: dict[str, Any] = {}
        self.capacity = 0  # sequences decoded at once, sized once the model is loaded (workers/capacity.py)
        self.telemetry = WorkerTelemetry.disabled()
        self.generation = 0  # the last Reset (drop everything) the loop has taken
        self.ready_for = 0  # the last Register the loop has answered
        self.consumed = 0  # the last inbox item taken
        self.out: list[Outgoing] = []  # said since the last report
        self.last_report: tuple[int, int, bool] = (-1, -1, False)
        self.cache_labels: list[str] = []  # the prompt cache's entries as last reported (workers/prefix_report.py)
        self.next_stats_s = 0.0
        self.faults = make_fault_injector(settings.worker_id, lambda: self.running)
        self.compile_pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar")

    # ---- setup ------------------------------------------------------------------

    def start(self) -> None:
        """Choose a BLAS, import MLX, load the model (all on this thread), then start the I/O thread."""
        from workers.blas import describe_blas, find_blas, preload_blas, share_threads

        # Connect to the collector first: by the time the model is loaded, the first event gets through.
        # (Held by a still-disabled telemetry so close() closes it even if loading fails.)
        sender = make_event_sender(self.s.metrics_events, f"worker:{self.s.worker_id}", ctx=self.ctx)
        self.telemetry = WorkerTelemetry(sender, None, model=self.s.model, worker=self.s.worker_id)

        preload_blas(find_blas(self.s.blas), threads=share_threads(self.s.memory_share))
        from workers.engine import adapter as engine_mod
        from workers.models.sources import resolve_source
        from workers.policies import make_auto_tuner, make_policy
        from workers.models.precision import describe_precision
        from workers.shard.engine import load_engine

        path = resolve_source(self.s.source, self.s.dtype)
        t0 = time.perf_counter()
        loaded = load_engine(str(path), self.s)  # a sharded group's rank 0 joins it here
        self.engine, model, self.capacity = loaded.engine, loaded.model, loaded.capacity.capacity
        b = dataclasses.replace(self.s.batching, decode_capacity=self.capacity)
        policy = make_policy(b, self.clock)
        self.telemetry = WorkerTelemetry(sender, policy, model=self.s.model, worker=self.s.worker_id)
        self.session = WorkerSession(self.engine, policy, clock=self.clock, tuner=make_auto_tuner(b, policy),
                                     telemetry=self.telemetry, max_prompt_tokens=self.s.max_prompt_tokens,
                                     idle_flush_s=self.s.heartbeat_interval_s, decode_capacity=self.capacity,
                                     compile_pool=self.compile_pool, wake=lambda: self.inbox.put(Wake()))
        self.info = {"blas": describe_blas(), **engine_mod.mlx_info(), "source": self.s.source, "dtype": self.s.dtype,
                     "precision": describe_precision(model),
                     "policy": b.policy, "window_ms": b.window_ms, "fast_path": b.fast_path,
                     "admission_batch": b.admission_batch,
                     "prompt_cache_max_entries": b.prompt_cache_entries, "prompt_cache_max_bytes": b.prompt_cache_bytes,
                     "solo_fast_path": self.engine.solo_fast_path, "capacity": loaded.capacity.info(), **loaded.info}
        log.info("loaded %s from %s in %.2fs; precision=%s; blas=%s", self.s.model, path, time.perf_counter() - t0,
                 self.info["precision"], self.info["blas"])
        log.info("decode capacity %d (%s)", self.capacity, loaded.capacity.reason)
        self.start_io()

    def start_io(self) -> None:
        """Start the I/O thread and connect this thread's end of the doorbell."""
        doorbell = f"inproc://worker-doorbell-{os.getpid()}-{next(_DOORBELLS)}"
        curve = load_client_keys(self.s.curve_secret, self.s.curve_server_public) if self.s.curve_secret else None
        ready = Ready(self.s.worker_id, self.s.model, self.capacity, os.getpid(),
                      socket.gethostname(), self.info)
        self.io = BrokerIO(self.ctx, self.clock, worker_id=self.s.worker_id, connect=self.s.connect,
                           inbox=self.inbox, outbox=self.outbox, doorbell=doorbell,
                           heartbeat_interval_s=self.s.heartbeat_interval_s,
                           heartbeat_liveness=self.s.heartbeat_liveness, ready=ready,
                           grace_s=self.s.recovery_grace_s, buffer_bytes=self.s.recovery_buffer_bytes, curve=curve)
        self.bell = self.ctx.socket(zmq.PAIR)
        self.bell.setsockopt(zmq.LINGER, 0)
        self.bell.connect(doorbell)
        self.io.start()

    def request_stop(self) -> None:
        """Stop the loop (signal-safe: a flag and a reentrant queue put)."""
        self.running = False
        self.inbox.put(Stop("asked to stop"))

    # ---- running ----------------------------------------------------------------

    def run(self) -> None:
        """The busy loop: blocks on the inbox only when there is nothing to step."""
        assert self.session is not None
        session = self.session
        while self.running:
            for item in self.take_input():
                self.handle(item)
            self.out += session.admit()
            stepping = session.stepping
            self.report(self.clock.now() if stepping else None)
            if stepping:
                if self.faults is not None:
                    self.faults.on_step()
                self.out += session.step()
            else:
                session.tick()
        if self.io is not None and self.io.failed:
            raise StartError("the worker's I/O thread failed (see the log above)")

    def take_input(self) -> list[InboxItem]:
        """What waits in the inbox; waits for the first item as long as the session allows."""
        assert self.session is not None
        wait_s = self.session.wait_s()
        if wait_s is None:  # idle: still wake once per heartbeat interval for the idle upkeep
            wait_s = self.s.heartbeat_interval_s
        if wait_s > 0:
            self.report(None)  # what the last step said goes out before the wait
        items: list[InboxItem] = []
        try:
            items.append(self.inbox.get(timeout=wait_s) if wait_s > 0 else self.inbox.get_nowait())
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return items

    def handle(self, item: InboxItem) -> None:
        """One inbox item: a dispatch, a cancel, a reset or stop."""
        assert self.session is not None
        if isinstance(item, Stop):
            self.running = False
            return
        if isinstance(item, Wake):
            return  # admit() takes what finished compiling
        self.consumed = item.seq
        if isinstance(item, Register):
            self.ready_for = item.registration  # alive: the I/O thread may say `ready`
        elif isinstance(item, Reset):
            dropped = self.session.in_flight
            if dropped:
                log.warning("%s; dropping %d requests", item.reason, dropped)
            self.session.drop_all()
            self.generation = item.generation
            self.out = []
        elif isinstance(item.msg, Dispatch):
            self.out += self.session.dispatch(item.msg, item.arrived_s)
            if self.faults is not None:
                self.faults.on_dispatch()
        elif isinstance(item.msg, Cancel):
            self.out += self.session.cancel(item.msg.request_id, item.msg.reason)

    def report(self, step_began_s: float | None) -> None:
        """Hand the I/O thread this turn's output and progress, and ring its doorbell."""
        assert self.session is not None
        now = self.clock.now()
        stats = None
        if now >= self.next_stats_s:
            stats = self.session.stats()
            self.next_stats_s = now + self.s.heartbeat_interval_s
        state = (self.consumed, self.session.steps_completed, step_began_s is not None)
        labels: list[str] | None = self.session.engine.prompt_cache.labels()
        if labels == self.cache_labels:
            labels = None  # unchanged since the last report
        if not self.out and stats is None and step_began_s is None and state == self.last_report and labels is None:
            return  # nothing new: an idle turn
        self.last_report = state
        self.cache_labels = labels if labels is not None else self.cache_labels
        self.outbox.put(LoopReport(self.generation, self.consumed, self.session.steps_completed, step_began_s,
                                   self.out, self.session.engine.free_slots, stats, self.ready_for, labels))
        self.out = []
        self._ring()

    def _ring(self) -> None:
        if self.bell is None:
            return
        try:
            self.bell.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # the I/O thread has a ring pending already

    # ---- close ------------------------------------------------------------------

    def close(self) -> None:
        """Fail what is still held, say goodbye, stop the I/O thread, close."""
        if self.session is not None and self.io is not None:
            self.out += self.session.stop("worker stopped before this request finished")
            self.out.append(Disconnect(self.s.worker_id, "worker stopping"))
            self.report(None)
        if self.io is not None:
            self.outbox.put(Close())
            self._ring()
            if not self.io.join(IO_JOIN_S):
                log.warning("the I/O thread did not stop within %gs", IO_JOIN_S)
        if self.bell is not None:
            self.bell.close(0)
        self.telemetry.close(time.monotonic())
        self.compile_pool.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.close()
        if self.io is None or not self.io.thread.is_alive():
            self.ctx.term()  # would wait forever on a socket the I/O thread still holds


def run_worker(settings: WorkerSettings) -> None:
    """Process entry point (spawned by the supervisor, or `mlx-fleet worker`)."""

    def hooks() -> Hooks:
        actor = WorkerActor(settings)
        return Hooks(start=actor.start, run=actor.run, close=actor.close, request_stop=actor.request_stop)

    run_process(f"worker:{settings.worker_id}", settings.log_level, hooks)
