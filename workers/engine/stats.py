"""The engine's counters: steps, the path each request took, and where each step's time went.

Pure: no MLX, no sockets. :class:`StepStats` holds cumulative figures the worker reports
in its heartbeats and its metric events. :class:`StepClock` splits the engine's busy time
into time inside mlx-lm and our own time around it, from a clock it is given.

Paths (``PATHS``): a request decoded from start to end by ``generate_step`` on an idle
engine is ``solo``; one inserted straight into the ``BatchGenerator`` is ``batch``; one
that started solo and moved into the batch when another request arrived is ``handoff``.

The split. A *cycle* runs from the start of one engine step to the start of the next,
while the engine has work: it holds the step itself and everything the worker does before
calling the next one (detokenizing, stop strings, messages, admission, telemetry). The part
of a cycle spent inside mlx-lm calls (the ``BatchGenerator`` or ``generate_step`` call and
its evaluation, inserts, removals, prompt-cache copies) is ``mlx_s``; the rest is
``own_s``. A busy period opens with the first insert into an idle engine; it closes at the
end of a step that leaves the engine idle, so idle waiting never counts, and neither does
the little the worker does after that last step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from actors.clock import Clock
from actors.metrics import ENGINE_PATHS

PATHS = ENGINE_PATHS
SOLO, BATCH, HANDOFF = PATHS


def _per_path() -> dict[str, int]:
    return dict.fromkeys(PATHS, 0)


@dataclass
class StepStats:
    """Per-step and per-path figures the worker reports (and the collector aggregates)."""

    steps: int = 0
    decode_steps: int = 0
    last_batch_size: int = 0
    max_batch_size: int = 0
    sequences_decoded: int = 0  # sum of batch sizes over decode steps
    generated_tokens: int = 0
    last_step_s: float = 0.0
    busy_s: float = 0.0  # summed duration of the engine's step calls
    solo_steps: int = 0  # decode steps made by generate_step (batch 1)
    batch_steps: int = 0  # decode steps made by the BatchGenerator
    handoffs: int = 0  # solo sequences moved into the BatchGenerator
    requests: dict[str, int] = field(default_factory=_per_path)  # finished requests by path
    cycles: int = 0  # closed step cycles (see the module doc)
    mlx_s: float = 0.0  # time of closed cycles inside mlx-lm
    own_s: float = 0.0  # time of closed cycles outside it
    shard_checked_steps: int = 0  # a sharded group's steps that every follower matched token for token (0 unsharded)
    # Decoding controls (parts of mlx_s: they run inside the step): filling grammar masks
    # (with the consuming of tokens, while the forward pass runs) and reading logprobs.
    masked_steps: int = 0  # steps with at least one grammar-constrained row
    mask_s: float = 0.0
    logprobs_s: float = 0.0

    @property
    def mean_batch_size(self) -> float:
        """Average number of sequences per decode step."""
        return self.sequences_decoded / self.decode_steps if self.decode_steps else 0.0

    def record_step(self, batch: int, step_s: float, *, solo: bool) -> None:
        """One engine step of ``batch`` decoded sequences (0: a prefill-only step) took ``step_s``."""
        self.steps += 1
        self.last_step_s = step_s
        self.busy_s += step_s
        self.last_batch_size = batch
        if batch:
            self.decode_steps += 1
            self.sequences_decoded += batch
            self.generated_tokens += batch
            self.max_batch_size = max(self.max_batch_size, batch)
            if solo:
                self.solo_steps += 1
            else:
                self.batch_steps += 1

    def as_dict(self) -> dict[str, Any]:
        """The flat map a heartbeat carries (times rounded; per-path counts as ``requests_<path>``)."""
        out: dict[str, Any] = {
            "steps": self.steps, "decode_steps": self.decode_steps, "max_batch_size": self.max_batch_size,
            "mean_batch_size": round(self.mean_batch_size, 3), "generated_tokens": self.generated_tokens,
            "busy_s": round(self.busy_s, 4), "solo_steps": self.solo_steps, "batch_steps": self.batch_steps,
            "handoffs": self.handoffs, "step_cycles": self.cycles, "mlx_s": round(self.mlx_s, 4),
            "own_s": round(self.own_s, 4), "shard_checked_steps": self.shard_checked_steps,
            "masked_steps": self.masked_steps, "mask_s": round(self.mask_s, 4), "logprobs_s": round(self.logprobs_s, 4),
        }
        out.update({f"requests_{path}": n for path, n in self.requests.items()})
        return out


class StepClock:
    """Splits busy engine time into mlx-lm's part and ours, into a :class:`StepStats`.

    The engine calls :meth:`open` when work arrives, :meth:`step_started` at each step,
    wraps every mlx-lm call in :meth:`mlx`, and calls :meth:`close` when a step leaves it
    idle. Only closed cycles are added, so ``mlx_s + own_s`` is their wall time.
    """

    def __init__(self, clock: Clock, stats: StepStats) -> None:
        self.clock = clock
        self.stats = stats
        self._cycle_start_s: float | None = None
        self._mlx_s = 0.0  # inside mlx-lm since the open cycle started
        self._depth = 0  # nested mlx() blocks count once

    @property
    def busy(self) -> bool:
        """Whether a cycle is open (the engine has had work since the last close)."""
        return self._cycle_start_s is not None

    def open(self) -> None:
        """Work arrived: start a cycle unless one is open."""
        if self._cycle_start_s is None:
            self._cycle_start_s = self.clock.now()
            self._mlx_s = 0.0

    def step_started(self) -> None:
        """A step begins: close the open cycle (if any) and start the next one here."""
        now = self.clock.now()
        if self._cycle_start_s is not None:
            self._add(now)
        self._cycle_start_s = now
        self._mlx_s = 0.0

    def close(self) -> None:
        """The engine went idle: the open cycle ends now."""
        if self._cycle_start_s is not None:
            self._add(self.clock.now())
            self._cycle_start_s = None
            self._mlx_s = 0.0

    @contextlib.contextmanager
    def mlx(self) -> Iterator[None]:
        """Time the block as mlx-lm's (outside an open cycle the time is dropped at the next open)."""
        if self._depth:
            yield
            return
        self._depth += 1
        t0 = self.clock.now()
        try:
            yield
        finally:
            self._depth -= 1
            self._mlx_s += self.clock.now() - t0

    def _add(self, now_s: float) -> None:
        assert self._cycle_start_s is not None
        wall_s = max(0.0, now_s - self._cycle_start_s)
        mlx_s = min(self._mlx_s, wall_s)
        self.stats.cycles += 1
        self.stats.mlx_s += mlx_s
        self.stats.own_s += wall_s - mlx_s
