"""A test-only fault switch for workers: hang, stall or crash on purpose.

Off in production. Faults are read from ``MLX_FLEET_FAULTS`` only when
``MLX_FLEET_ENABLE_FAULTS=1`` is also set, so a stray variable cannot break a
real fleet. The value is a comma-separated list of ``key=value``:

- ``worker=ID``: only the worker with this id is affected (default: every worker);
- ``hang_after_dispatches=N``: on the N-th dispatch the worker's MLX loop stops, as if
  an MLX call never returned, until SIGTERM or ``hang_s``; its I/O thread goes on
  heartbeating (with no progress), so the broker declares it hung after ``hung_step_s``;
- ``hang_s=F``: how long a hang lasts (default: until the process is stopped);
- ``stall_step_s=F``: one engine step takes F seconds longer, as a very long prefill would;
  the loop stays inside that step (the I/O thread keeps heartbeating and answering);
- ``stall_at_step=N``: which engine step stalls (default 1, the first);
- ``exit_after_dispatches=N``: on the N-th dispatch the process exits at once
  (``os._exit``, no teardown), as a crash would;
- ``exit_code=N``: the code of that exit (default 70).

Example: ``MLX_FLEET_FAULTS="worker=demo-1,hang_after_dispatches=3"``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping

log = logging.getLogger("mlx_fleet.faults")

ENABLE_VAR = "MLX_FLEET_ENABLE_FAULTS"
FAULTS_VAR = "MLX_FLEET_FAULTS"


class FaultSpecError(ValueError):
    """``MLX_FLEET_FAULTS`` could not be parsed."""


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject, parsed from ``MLX_FLEET_FAULTS``."""

    worker: str | None = None
    hang_after_dispatches: int | None = None
    hang_s: float | None = None
    exit_after_dispatches: int | None = None
    exit_code: int = 70
    stall_step_s: float | None = None
    stall_at_step: int = 1

    def applies_to(self, worker_id: str) -> bool:
        """True when this plan targets ``worker_id``."""
        return self.worker is None or self.worker == worker_id


_INT_KEYS = ("hang_after_dispatches", "exit_after_dispatches", "exit_code", "stall_at_step")
_FLOAT_KEYS = ("hang_s", "stall_step_s")


def parse_faults(text: str) -> FaultPlan:
    """Parse ``key=value,key=value``; raises FaultSpecError naming the bad part."""
    values: dict[str, object] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise FaultSpecError(f"{FAULTS_VAR}: expected key=value, got {part!r}")
        try:
            if key == "worker":
                values[key] = value
            elif key in _INT_KEYS:
                values[key] = int(value)
            elif key in _FLOAT_KEYS:
                values[key] = float(value)
            else:
                raise FaultSpecError(f"{FAULTS_VAR}: unknown fault {key!r}")
        except ValueError as exc:
            if isinstance(exc, FaultSpecError):
                raise
            raise FaultSpecError(f"{FAULTS_VAR}: bad value for {key}: {value!r}") from None
    return FaultPlan(**values)  # type: ignore[arg-type]


def load_faults(worker_id: str, env: Mapping[str, str] | None = None) -> FaultPlan | None:
    """The plan for ``worker_id``, or None (always None unless faults are enabled)."""
    env = os.environ if env is None else env
    if env.get(ENABLE_VAR) != "1" or not env.get(FAULTS_VAR):
        return None
    plan = parse_faults(env[FAULTS_VAR])
    return plan if plan.applies_to(worker_id) else None


class FaultInjector:
    """Counts worker events and fires the planned fault at the planned one."""

    def __init__(
        self,
        plan: FaultPlan,
        *,
        keep_running: Callable[[], bool],
        sleep: Callable[[float], None] = time.sleep,
        exit_process: Callable[[int], None] = os._exit,
    ) -> None:
        self.plan = plan
        self.keep_running = keep_running
        self.sleep = sleep
        self.exit_process = exit_process
        self.dispatches = 0
        self.hangs = 0
        self.steps = 0

    def on_dispatch(self) -> None:
        """Called once per dispatch the worker accepts."""
        self.dispatches += 1
        p = self.plan
        if p.exit_after_dispatches is not None and self.dispatches == p.exit_after_dispatches:
            log.error("fault: exiting with code %d at dispatch %d", p.exit_code, self.dispatches)
            self.exit_process(p.exit_code)
        if p.hang_after_dispatches is not None and self.dispatches == p.hang_after_dispatches:
            self.hang()

    def on_step(self) -> None:
        """Called by the MLX loop as each engine step begins."""
        self.steps += 1
        p = self.plan
        if p.stall_step_s is not None and self.steps == p.stall_at_step:
            log.error("fault: stalling engine step %d for %gs", self.steps, p.stall_step_s)
            self._block(p.stall_step_s)

    def hang(self) -> None:
        """Block the calling (MLX) thread: no steps, no input taken."""
        self.hangs += 1
        log.error("fault: hanging at dispatch %d (for %s)", self.dispatches,
                  f"{self.plan.hang_s:g}s" if self.plan.hang_s is not None else "ever")
        self._block(self.plan.hang_s)

    def _block(self, seconds: float | None) -> None:
        until_s = None if seconds is None else time.monotonic() + seconds
        # Still honour SIGTERM (keep_running turns false) so tests tear down quickly.
        while self.keep_running() and (until_s is None or time.monotonic() < until_s):
            self.sleep(0.05)


def make_fault_injector(worker_id: str, keep_running: Callable[[], bool]) -> FaultInjector | None:
    """The injector for this worker, or None in production."""
    plan = load_faults(worker_id)
    if plan is None:
        return None
    log.warning("fault injection enabled for %s: %s", worker_id, plan)
    return FaultInjector(plan, keep_running=keep_running)
