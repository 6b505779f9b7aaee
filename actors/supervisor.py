"""The supervisor behind `mlx-fleet up`: spawn, wait for ready, restart, drain.

Children are started with ``spawn`` and ask the kernel to end them if the
supervisor dies. A child that exits is restarted with exponential backoff,
at most ``restart_max`` times in ``restart_window_s``; past that it is given up
and reported, and the rest of the fleet keeps running.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from actors.config import FleetConfig
from actors.curve import check_bind_policy, local_client_keys
from actors.model_manager import ModelManager
from actors.proc import die_with_parent, spawn_context

log = logging.getLogger("mlx_fleet.supervisor")


class StartupError(RuntimeError):
    """The fleet could not come up; the message names the setting to change."""


def _child_main(target: Callable[[Any], None], arg: Any) -> None:
    die_with_parent()
    target(arg)


@dataclass
class Child:
    """One supervised process and its restart history."""

    name: str
    kind: str  # broker | worker | collector
    target: Callable[[Any], None]
    arg: Any
    process: BaseProcess | None = None
    restarts: int = 0
    restart_times_s: list[float] = field(default_factory=list)
    next_start_s: float = 0.0
    backoff_s: float = 0.5
    gave_up: bool = False
    last_exit: int | None = None

    def start(self) -> None:
        """Spawn the process."""
        self.process = spawn_context().Process(target=_child_main, args=(self.target, self.arg), name=self.name)
        self.process.start()

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.is_alive()


def worker_settings(cfg: FleetConfig) -> list[Any]:
    """One WorkerSettings per model replica."""
    from workers.worker import WorkerSettings

    out = []
    for spec in cfg.models:
        if spec.on_demand:
            continue  # started by the broker's first request (actors/model_manager.py)
        for i in range(spec.replicas):
            out.append(WorkerSettings(
                worker_id=f"{spec.name}-{i}", model=spec.name, source=spec.source, connect=local_backend(cfg.backend),
                batching=spec.batching, heartbeat_interval_s=cfg.heartbeat_interval_s,
                heartbeat_liveness=cfg.heartbeat_liveness, blas=cfg.blas, log_level=cfg.log_level,
            ))
    return out


def local_backend(addr: str) -> str:
    """Where local workers connect for a bind address (a wildcard binds every interface)."""
    return addr.replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:", "://127.0.0.1:")


class Supervisor:
    """Owns every child process of one fleet."""

    def __init__(self, cfg: FleetConfig) -> None:
        from broker.broker import run_broker
        from workers.worker import run_worker

        self.cfg = cfg
        self.children: list[Child] = [Child("broker", "broker", run_broker, cfg)]
        for ws in worker_settings(cfg):
            self.children.append(Child(f"worker:{ws.worker_id}", "worker", run_worker, ws))
        self.stop_event = threading.Event()
        self.models = ModelManager(self)  # runtime load/unload and on-demand models (opened by start)

    # ---- start ----------------------------------------------------------------------

    def start(self) -> None:
        """Spawn everything and wait until every replica has registered with the broker."""
        for warning in check_bind_policy(self.cfg):
            log.warning("%s", warning)
        problem = self.models.startup_problem()
        if problem:
            raise StartupError(problem)
        self.models.open()
        for child in self.children:
            child.start()
        self.wait_ready()

    def wait_ready(self) -> None:
        """Poll the broker's status until all replicas are ready, or fail naming the setting."""
        from broker.client import Client, FleetError

        want = {m.name: m.replicas for m in self.cfg.models if not m.on_demand}
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        have: dict[str, int] = {}
        with Client(local_backend(self.cfg.frontend), timeout_s=2.0, curve=local_client_keys(self.cfg)) as client:
            while time.monotonic() < deadline:
                if self.stop_event.is_set():
                    raise StartupError("interrupted while starting")
                for child in self.children:
                    if child.process is not None and not child.alive:
                        code = child.process.exitcode
                        raise StartupError(f"{child.name} exited with code {code} during start-up (see its log above)")
                try:
                    models = client.status(timeout_s=1.0)["models"]
                except FleetError:
                    continue
                have = {name: len(models.get(name, {}).get("workers", [])) for name in want}
                if all(have[n] >= want[n] for n in want):
                    return
                self.stop_event.wait(0.2)
        missing = ", ".join(f"{n} ({have.get(n, 0)}/{want[n]})" for n in want if have.get(n, 0) < want[n])
        raise StartupError(
            f"workers not ready within ready_timeout_s={self.cfg.ready_timeout_s:g}s: {missing}; "
            "raise --ready-timeout or ready_timeout_s in the config"
        )

    # ---- run ----------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        """Signal-safe: ask the run loop to drain and exit."""
        self.stop_event.set()

    def run(self) -> None:
        """Watch children until asked to stop; restart what dies."""
        while not self.models.wait(0.2):  # serves the control channel meanwhile
            self.check_children()

    def check_children(self) -> None:
        """Restart exited children, respecting backoff and the intensity limit."""
        now = time.monotonic()
        for child in self.children:
            if child.gave_up or child.alive or child.process is None:
                continue
            if child.last_exit is None:
                child.last_exit = child.process.exitcode
                child.restart_times_s = [t for t in child.restart_times_s if now - t < self.cfg.restart_window_s]
                if len(child.restart_times_s) >= self.cfg.restart_max:
                    child.gave_up = True
                    log.error("%s exited (code %s) %d times in %.0fs; giving up on it",
                              child.name, child.last_exit, len(child.restart_times_s), self.cfg.restart_window_s)
                    continue
                child.next_start_s = now + child.backoff_s
                log.warning("%s exited with code %s; restarting in %.1fs", child.name, child.last_exit, child.backoff_s)
                child.backoff_s = min(child.backoff_s * 2, 30.0)
            if now >= child.next_start_s:
                child.restarts += 1
                child.restart_times_s.append(now)
                child.last_exit = None
                child.start()

    def restart_counts(self) -> dict[str, Any]:
        """Restarts and state per child, for status and metrics."""
        return {c.name: {"restarts": c.restarts, "alive": c.alive, "gave_up": c.gave_up,
                         "pid": c.process.pid if c.process else None} for c in self.children}

    # ---- stop ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Drain the broker, then stop workers; kill whatever outlives its deadline."""
        broker = [c for c in self.children if c.kind == "broker"]
        others = [c for c in self.children if c.kind != "broker"]
        self._stop(broker, self.cfg.drain_timeout_s + 5.0)
        self._stop(others, 10.0)
        self.models.close()

    def _stop(self, children: list[Child], timeout_s: float) -> None:
        procs = [c.process for c in children if c.process is not None and c.process.is_alive()]
        for p in procs:
            p.terminate()  # SIGTERM: the child drains or tears down
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("%s did not stop in %.0fs; killing it", p.name, timeout_s)
                p.kill()
                p.join(5.0)


def run_fleet(cfg: FleetConfig, *, on_ready: Callable[[], None] | None = None) -> int:
    """Run a fleet in the foreground until SIGINT/SIGTERM; returns the exit code."""
    sup = Supervisor(cfg)
    signal.signal(signal.SIGINT, sup.request_stop)
    signal.signal(signal.SIGTERM, sup.request_stop)
    try:
        sup.start()
        if on_ready is not None:
            on_ready()
        sup.run()
        log.info("stopping: draining in-flight requests (drain_timeout_s=%g)", cfg.drain_timeout_s)
        return 0
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    finally:
        sup.shutdown()
