"""The worker's side of metrics: cheap buffering, few events (schema in actors.metrics).

Per engine step the worker only appends a number to a list. The buffered
steps go out as one ``step`` event at most every ``flush_interval_s`` (and
when the engine goes idle, and with each heartbeat so the gauges stay fresh),
with what the engine's cumulative counters (requests and decode steps by path,
the mlx-lm/own split of its busy time) gained since the last event.
Each finished request is one ``request`` event whose inter-token latencies
are binned here, so no event is ever sent per token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from actors.metrics import ITL_BUCKETS_S, EventSender, NullSender, bucket_counts
from workers.engine.stats import StepStats

FLUSH_INTERVAL_S = 0.1
MAX_BUFFERED = 512  # flush early rather than grow an event past this many items


class WorkerTelemetry:
    """Buffers one worker's step figures and sends its metric events.

    ``policy`` is the worker's AdmissionPolicy (``admission_batch``,
    ``window_ms``, ``stats.fast_path_admissions``). With a disabled sender
    every method returns at once.
    """

    def __init__(self, sender: EventSender | NullSender, policy: Any, *, model: str, worker: str,
                 flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.sender = sender
        self.enabled = sender.enabled and policy is not None
        self.policy = policy
        self.model = model
        self.worker = worker
        self.flush_interval_s = flush_interval_s
        self._batch_sizes: list[int] = []
        self._steps = 0
        self._busy_s = 0.0
        self._window_wait_s: list[float] = []
        self._fast_path_sent = 0
        self._engine: StepStats | None = None
        self._engine_sent = StepStats()  # the engine's cumulative counters as of the last event
        self._last_flush_s = 0.0

    @classmethod
    def disabled(cls) -> "WorkerTelemetry":
        """Telemetry that sends nothing (metrics off, or before set-up)."""
        return cls(NullSender(), None, model="", worker="")

    def on_admit(self, wait_s: float, now_s: float) -> None:
        """One batch admitted; its oldest request waited ``wait_s`` at this worker."""
        if not self.enabled:
            return
        self._window_wait_s.append(max(0.0, wait_s))
        if len(self._window_wait_s) >= MAX_BUFFERED:
            self.flush(now_s)

    def on_step(self, stats: StepStats, now_s: float) -> None:
        """One engine step: ``stats`` is the engine's (its last step's size and time, and the totals)."""
        if not self.enabled:
            return
        self._engine = stats
        self._steps += 1
        self._busy_s += stats.last_step_s
        if stats.last_batch_size > 0:  # a prefill-only step decodes nothing
            self._batch_sizes.append(stats.last_batch_size)
        if now_s - self._last_flush_s >= self.flush_interval_s or len(self._batch_sizes) >= MAX_BUFFERED:
            self.flush(now_s)

    def flush(self, now_s: float) -> None:
        """Send the buffered steps and the current admission settings as one ``step`` event."""
        if not self.enabled:
            return
        fast_path = self.policy.stats.fast_path_admissions
        self.sender.send("step", {
            "model": self.model, "worker": self.worker, "batch_sizes": self._batch_sizes, "steps": self._steps,
            "busy_s": self._busy_s, "window_wait_s": self._window_wait_s,
            "fast_path_admissions": max(0, fast_path - self._fast_path_sent),
            "admission_batch": int(self.policy.admission_batch), "window_s": self.policy.window_ms / 1000.0,
            **self._engine_increments(),
        })
        self._fast_path_sent = fast_path
        self._batch_sizes = []
        self._window_wait_s = []
        self._steps = 0
        self._busy_s = 0.0
        self._last_flush_s = now_s

    def _engine_increments(self) -> dict[str, Any]:
        """What the engine's counters gained since the last event (nothing before its first step)."""
        e, sent = self._engine, self._engine_sent
        if e is None:
            return {}
        out = {"paths": {p: max(0, n - sent.requests[p]) for p, n in e.requests.items()},
               "path_steps": {"solo": max(0, e.solo_steps - sent.solo_steps),
                              "batch": max(0, e.batch_steps - sent.batch_steps)},
               "mlx_s": max(0.0, e.mlx_s - sent.mlx_s), "own_s": max(0.0, e.own_s - sent.own_s)}
        self._engine_sent = dataclasses.replace(e, requests=dict(e.requests))
        return out

    def on_request(self, *, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                   queue_s: float | None, ttft_s: float | None, e2e_s: float, itl_s: list[float]) -> None:
        """One request finished; send its ``request`` event. None leaves a time out (never reached)."""
        if not self.enabled:
            return
        event: dict[str, Any] = {
            "model": self.model, "worker": self.worker, "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "e2e_s": max(0.0, e2e_s),
            "itl_counts": bucket_counts(itl_s, ITL_BUCKETS_S), "itl_sum_s": max(0.0, sum(itl_s)),
        }
        if queue_s is not None:
            event["queue_s"] = max(0.0, queue_s)
        if ttft_s is not None:
            event["ttft_s"] = max(0.0, ttft_s)
        self.sender.send("request", event)

    def close(self, now_s: float) -> None:
        """Flush what is buffered and close the sender."""
        self.flush(now_s)
        self.sender.close()
