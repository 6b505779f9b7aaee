"""The supervisor's children: one registry that spawns, restarts, gives up on and retires processes.

A child that exits is restarted with exponential backoff (``restart_backoff_s``
doubling up to ``restart_backoff_max_s``; reset after a run of
``restart_stable_s``), at most ``restart_max`` times in ``restart_window_s``.
A planned restart (:meth:`Children.hand_over`: SIGUSR1, the broker hands its work on
and exits) starts the child again at once and does not count toward ``restart_max``.
Past that it is given up on and stays in the registry, so `status` can show it.
A retired child (its model was unloaded or went idle) leaves the registry at
once: it gets SIGTERM, and SIGKILL if it still runs ``stop_grace_s`` later.

The registry starts processes through a ``launch`` function and reads time from
a clock; its owner's loop calls :meth:`Children.check` and :meth:`Children.reap`.
Unit tests give it fake processes and a fake clock.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from actors.clock import Clock
from actors.config import BatchingConfig, FleetConfig
from actors.proc import Process
from actors.shard_group import ProcessGroup

log = logging.getLogger("mlx_fleet.supervisor")

# The kinds of child a fleet runs.
BROKER, WORKER, COLLECTOR, GATEWAY = "broker", "worker", "collector", "gateway"
STOP_GRACE_S = 10.0  # a retired or stopped child gets this long to tear down before it is killed
MAX_EXITED_PIDS = 8  # pids of a child's past processes kept (the broker drops their registrations)


@dataclass(frozen=True)
class WorkerSpec:
    """One local worker replica: its id (and ZeroMQ identity), its model and where the weights come from."""

    worker_id: str
    model: str
    source: str
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    dtype: str = "auto"  # the precision it loads the model at (actors.config.DTYPES)
    shards: int = 1  # ranks of its group (actors/shard_group.py); 1: one process
    shard_mode: str = "auto"
    chat_template: str = ""  # ModelSpec.chat_template
    tool_format: str = ""  # ModelSpec.tool_format
    memory_share: int = 1  # worker processes of the fleet on this machine: "auto" capacity divides the memory, the BLAS the cores


@dataclass(frozen=True)
class ChildSpec:
    """What one child runs: a fleet service (broker, collector, gateway) or a worker replica."""

    name: str
    kind: str
    worker: WorkerSpec | None = None

    @classmethod
    def service(cls, kind: str) -> "ChildSpec":
        """The broker, the collector or the gateway."""
        return cls(kind, kind)

    @classmethod
    def for_worker(cls, spec: WorkerSpec) -> "ChildSpec":
        """A worker replica, named ``worker:<worker_id>``."""
        return cls(f"worker:{spec.worker_id}", WORKER, spec)


Launch = Callable[[ChildSpec], Process]


@dataclass(frozen=True)
class RestartPolicy:
    """When an exited child is started again, and when it is given up on."""

    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    window_s: float = 60.0
    max_restarts: int = 5
    stable_s: float = 10.0  # a run this long resets the backoff

    @classmethod
    def from_config(cls, cfg: FleetConfig) -> "RestartPolicy":
        """The ``restart_*`` settings of a fleet."""
        return cls(cfg.restart_backoff_s, cfg.restart_backoff_max_s, cfg.restart_window_s, cfg.restart_max,
                   cfg.restart_stable_s)


@dataclass(eq=False)
class Child:
    """One supervised process and its restart history (compared by identity)."""

    spec: ChildSpec
    backoff_s: float
    process: Process | None = None
    restarts: int = 0
    restart_times_s: list[float] = field(default_factory=list)
    next_start_s: float = 0.0
    gave_up: bool = False
    last_exit: int | None = None
    started_at_s: float = 0.0
    exited_pids: deque[int] = field(default_factory=lambda: deque(maxlen=MAX_EXITED_PIDS))
    handover_deadline_s: float | None = None  # asked to hand over and exit (a planned restart): killed past this
    planned_start: bool = False  # its next start is a planned restart's: not counted toward restart_max

    @property
    def name(self) -> str:
        """``broker``, ``collector``, ``gateway`` or ``worker:<worker_id>``."""
        return self.spec.name

    @property
    def kind(self) -> str:
        """broker | worker | collector | gateway."""
        return self.spec.kind

    @property
    def worker_id(self) -> str | None:
        """The worker id of a worker child."""
        return self.spec.worker.worker_id if self.spec.worker else None

    @property
    def model(self) -> str | None:
        """The model of a worker child."""
        return self.spec.worker.model if self.spec.worker else None

    @property
    def pid(self) -> int | None:
        """The pid of its latest process."""
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        """True while its process runs."""
        return self.process is not None and self.process.is_alive()

    def view(self, now_s: float) -> dict[str, Any]:
        """This child as one entry of the supervisor's state message (``actors.control.SupervisorState``)."""
        entry: dict[str, Any] = {"name": self.name, "kind": self.kind, "alive": self.alive, "restarts": self.restarts,
                                 "gave_up": self.gave_up, "exited_pids": list(self.exited_pids)}
        optional = {"worker_id": self.worker_id, "model": self.model, "last_exit": self.last_exit, "pid": self.pid}
        entry.update({k: v for k, v in optional.items() if v is not None})
        if isinstance(self.process, ProcessGroup):
            entry["ranks"] = self.process.view()
        if self.last_exit is not None and not self.gave_up:
            entry["next_start_in_s"] = round(max(0.0, self.next_start_s - now_s), 3)
        return entry


class Children:
    """Every child of one supervisor, in start order; the only code that starts or stops them."""

    def __init__(self, launch: Launch, clock: Clock, policy: RestartPolicy | None = None, *,
                 stop_grace_s: float = STOP_GRACE_S, send_signal: Callable[[int, int], None] = os.kill) -> None:
        self._launch = launch
        self._send_signal = send_signal
        self.clock = clock
        self.policy = policy or RestartPolicy()
        self.stop_grace_s = stop_grace_s
        self._children: dict[str, Child] = {}
        self._retiring: list[tuple[Child, float]] = []  # (child, kill deadline) of retired children still running

    # ---- lookups ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._children.values()))

    def __len__(self) -> int:
        return len(self._children)

    def __getitem__(self, name: str) -> Child:
        return self._children[name]

    def get(self, name: str) -> Child | None:
        """The child named ``name``, or None."""
        return self._children.get(name)

    def workers(self, model: str | None = None, *, include_gave_up: bool = True) -> list[Child]:
        """Worker children (of ``model`` when given)."""
        return [c for c in self._children.values() if c.kind == WORKER and (model is None or c.model == model)
                and (include_gave_up or not c.gave_up)]

    def by_worker_id(self, worker_id: Any) -> Child | None:
        """The worker child with this worker id, or None."""
        return next((c for c in self._children.values() if c.worker_id == worker_id), None)

    def retiring(self) -> list[Child]:
        """Retired children whose process still runs."""
        return [c for c, _ in self._retiring]

    # ---- starting ---------------------------------------------------------------------

    def add(self, spec: ChildSpec) -> Child:
        """Register a child (not started yet)."""
        if spec.name in self._children:
            raise ValueError(f"a child named {spec.name!r} is already supervised")
        child = self._children[spec.name] = Child(spec, backoff_s=self.policy.backoff_s)
        return child

    def start(self, name: str) -> Child:
        """Start the process of child ``name`` now."""
        child = self._children[name]
        child.process = self._launch(child.spec)
        child.started_at_s = self.clock.now()
        return child

    def start_all(self) -> None:
        """Start every child that is not running and not given up on."""
        for child in self:
            if not child.alive and not child.gave_up:
                self.start(child.name)

    def check(self) -> list[Child]:
        """Restart exited children, respecting backoff and the restart limit; the children that changed."""
        now = self.clock.now()
        changed = []
        for child in self:
            if child.alive and child.handover_deadline_s is not None and now >= child.handover_deadline_s:
                log.warning("%s did not hand over within %.0fs; killing it", child.name, self.stop_grace_s)
                self.kill(child)
            if child.gave_up or child.alive or child.process is None:
                continue
            if child.last_exit is None:
                changed.append(child)
                self._on_exit(child, now)
                if child.gave_up:
                    continue
            if now >= child.next_start_s:
                if child not in changed:
                    changed.append(child)
                child.restarts += 1
                if not child.planned_start:
                    child.restart_times_s.append(now)
                child.planned_start = False
                child.last_exit = None
                self.start(child.name)
        return changed

    def _on_exit(self, child: Child, now_s: float) -> None:
        """Record an exit; schedule the restart, or give up past the restart limit."""
        assert child.process is not None
        child.last_exit = child.process.exitcode
        if child.process.pid is not None:
            child.exited_pids.append(child.process.pid)
        policy = self.policy
        if child.handover_deadline_s is not None:
            child.handover_deadline_s = None
            child.next_start_s, child.planned_start = now_s, True  # asked for: back at once, not a crash
            log.info("%s handed over (exit code %s); starting it again", child.name, child.last_exit)
            return
        if now_s - child.started_at_s >= min(policy.stable_s, policy.window_s):
            child.backoff_s = policy.backoff_s  # it had been stable: start the backoff over
        child.restart_times_s = [t for t in child.restart_times_s if now_s - t < policy.window_s]
        if len(child.restart_times_s) >= policy.max_restarts:
            child.gave_up = True
            log.error("%s exited (code %s) after %d restarts in %.0fs (restart_max=%d); giving up on it",
                      child.name, child.last_exit, len(child.restart_times_s), policy.window_s, policy.max_restarts)
            return
        child.next_start_s = now_s + child.backoff_s
        log.warning("%s exited with code %s; restarting in %.1fs", child.name, child.last_exit, child.backoff_s)
        child.backoff_s = min(child.backoff_s * 2, policy.backoff_max_s)

    def hand_over(self, name: str) -> bool:
        """A planned restart: ask child ``name`` (SIGUSR1) to hand its work on and exit; True if asked."""
        child = self._children.get(name)
        if child is None or not child.alive or child.pid is None or child.handover_deadline_s is not None:
            return False
        self._send_signal(child.pid, signal.SIGUSR1)
        child.handover_deadline_s = self.clock.now() + self.stop_grace_s
        return True

    # ---- stopping -----------------------------------------------------------------------

    def kill(self, child: Child) -> None:
        """SIGKILL a child's process (it is then restarted like any exit)."""
        if child.process is not None and child.process.is_alive():
            child.process.kill()

    def retire(self, children: Iterable[Child]) -> list[str]:
        """Take children out of the registry and SIGTERM them; their names."""
        deadline_s = self.clock.now() + self.stop_grace_s
        names = []
        for child in children:
            if self._children.pop(child.name, None) is None:
                continue
            names.append(child.name)
            if child.alive:
                assert child.process is not None
                child.process.terminate()
                self._retiring.append((child, deadline_s))
        return names

    def reap(self) -> None:
        """Forget retired children that exited; SIGKILL those past their grace period."""
        now = self.clock.now()
        still = []
        for child, deadline_s in self._retiring:
            proc = child.process
            if proc is None or not proc.is_alive():
                if proc is not None:
                    proc.join(0)
                continue
            if now >= deadline_s:
                log.warning("%s did not stop in %.0fs; killing it", child.name, self.stop_grace_s)
                proc.kill()
            still.append((child, deadline_s))
        self._retiring = still

    def stop(self, children: Iterable[Child], timeout_s: float) -> None:
        """SIGTERM, wait up to ``timeout_s`` for all, SIGKILL what is left (blocking; for shutdown)."""
        procs = [(c.name, c.process) for c in children if c.process is not None and c.process.is_alive()]
        for _, proc in procs:
            proc.terminate()  # the child drains or tears down
        deadline_s = self.clock.now() + timeout_s
        for name, proc in procs:
            proc.join(max(0.0, deadline_s - self.clock.now()))
            if proc.is_alive():
                log.warning("%s did not stop in %.0fs; killing it", name, timeout_s)
                proc.kill()
                proc.join(5.0)

    def close(self) -> None:
        """Stop what is still retiring (blocking, up to ``stop_grace_s``)."""
        self.stop(self.retiring(), self.stop_grace_s)
        self._retiring = []
