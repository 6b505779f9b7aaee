"""The supervisor behind `mlx-fleet up`: spawn, wait for ready, restart, drain.

Children are started with ``spawn`` and ask the kernel to end them if the
supervisor dies. A child that exits is restarted with exponential backoff
(``restart_backoff_s`` doubling up to ``restart_backoff_max_s``; reset after a
run of ``restart_window_s``), at most ``restart_max`` times in
``restart_window_s``. Past that a worker is given up and reported, and the rest
of the fleet keeps running; the broker is essential, so giving up on it stops
the fleet with an error.

The supervisor reports its children to the broker (``fleet_info``, see
:mod:`actors.reporter`), which shows restarts in `status`, forgets a worker as
soon as its process exits, and names workers it declared dead for silence: one
still running ``hung_grace_s`` later is hung, and is killed and restarted.

With ``metrics_export`` on, the collector is a child too, started first. It is
not on the serving path: start-up does not wait for it, and when it dies the
others' metric events are dropped until it is back.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from actors.config import FleetConfig
from actors.curve import check_bind_policy, local_client_keys
from actors.metrics import EventSender, NullSender, events_addr, make_event_sender
from actors.model_manager import ModelManager
from actors.proc import die_with_parent, spawn_context
from actors.reporter import FleetReporter

log = logging.getLogger("mlx_fleet.supervisor")

METRICS_REFRESH_S = 2.0  # resend the restart counts this often (a restarted collector relearns them)


class StartupError(RuntimeError):
    """The fleet could not come up; the message names the setting to change."""


def _child_main(target: Callable[[Any], None], arg: Any) -> None:
    die_with_parent()
    target(arg)


@dataclass
class Child:
    """One supervised process and its restart history."""

    name: str
    kind: str  # broker | worker | gateway | collector
    target: Callable[[Any], None]
    arg: Any
    worker_id: str | None = None
    model: str | None = None
    process: BaseProcess | None = None
    restarts: int = 0
    restart_times_s: list[float] = field(default_factory=list)
    next_start_s: float = 0.0
    backoff_s: float = 0.5
    gave_up: bool = False
    last_exit: int | None = None
    started_at_s: float = 0.0
    exited_pids: deque[int] = field(default_factory=lambda: deque(maxlen=8))

    def start(self) -> None:
        """Spawn the process."""
        self.process = spawn_context().Process(target=_child_main, args=(self.target, self.arg), name=self.name)
        self.process.start()
        self.started_at_s = time.monotonic()

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.is_alive()

    def report(self, now_s: float) -> dict[str, Any]:
        """This child as one ``fleet_info`` entry."""
        entry: dict[str, Any] = {"name": self.name, "kind": self.kind, "alive": self.alive, "restarts": self.restarts,
                                 "gave_up": self.gave_up, "exited_pids": list(self.exited_pids)}
        optional = {"worker_id": self.worker_id, "model": self.model, "last_exit": self.last_exit,
                    "pid": self.process.pid if self.process is not None else None}
        entry.update({k: v for k, v in optional.items() if v is not None})
        if self.last_exit is not None and not self.gave_up:
            entry["next_start_in_s"] = round(max(0.0, self.next_start_s - now_s), 3)
        return entry


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
                metrics_events=events_addr(cfg.metrics_export, cfg.metrics_events),
            ))
    return out


def local_backend(addr: str) -> str:
    """Where local workers connect for a bind address (a wildcard binds every interface)."""
    return addr.replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:", "://127.0.0.1:")


class Supervisor:
    """Owns every child process of one fleet."""

    def __init__(self, cfg: FleetConfig) -> None:
        from actors.collector import run_collector
        from broker.broker import run_broker
        from workers.worker import run_worker

        self.cfg = cfg
        self.children: list[Child] = []
        backoff_s = cfg.restart_backoff_s
        if cfg.metrics_export:
            self.children.append(Child("collector", "collector", run_collector, cfg, backoff_s=backoff_s))
        self.children.append(Child("broker", "broker", run_broker, cfg, backoff_s=backoff_s))
        for ws in worker_settings(cfg):
            self.children.append(Child(f"worker:{ws.worker_id}", "worker", run_worker, ws, worker_id=ws.worker_id,
                                       model=ws.model, backoff_s=backoff_s))
        if cfg.http_port:
            from broker.gateway import run_gateway

            self.children.append(Child("gateway", "gateway", run_gateway, cfg, backoff_s=backoff_s))
        self.stop_event = threading.Event()
        self.failure: str | None = None  # set when the fleet cannot go on (the broker was given up)
        self.events: EventSender | NullSender | None = None
        self._reported: tuple[Any, ...] = ()
        self._next_report_s = 0.0
        self.reporter: FleetReporter | None = None
        self.report_every_s = min(1.0, cfg.heartbeat_interval_s)
        self.next_report_s = 0.0
        self.models = ModelManager(self)  # runtime load/unload and on-demand models (opened by start)

    # ---- start ----------------------------------------------------------------------

    def start(self) -> None:
        """Spawn everything not yet running and wait until every replica has registered with the broker."""
        for warning in check_bind_policy(self.cfg):
            log.warning("%s", warning)
        problem = self.models.startup_problem()
        if problem:
            raise StartupError(problem)
        self.models.open()  # the runtime folder (and local CurveZMQ keys) first: the reporter needs them
        if self.events is None:  # connect early, so the first report is not dropped
            self.events = make_event_sender(events_addr(self.cfg.metrics_export, self.cfg.metrics_events), "supervisor")
        if self.reporter is None:
            self.reporter = FleetReporter(local_backend(self.cfg.backend), curve=local_client_keys(self.cfg))
        for child in self.children:
            if not child.alive:
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
                    if child.kind != "collector" and child.process is not None and not child.alive:
                        code = child.process.exitcode
                        raise StartupError(f"{child.name} exited with code {code} during start-up (see its log above)")
                self.report(force=False)
                try:
                    models = client.status(timeout_s=1.0)["models"]
                except FleetError:
                    continue
                have = {name: sum(1 for w in models.get(name, {}).get("workers", []) if w["state"] == "ready")
                        for name in want}
                if all(have[n] >= want[n] for n in want) and self.gateway_listening():
                    return
                self.stop_event.wait(0.2)
        missing = ", ".join(f"{n} ({have.get(n, 0)}/{want[n]})" for n in want if have.get(n, 0) < want[n])
        if not missing:
            missing = f"HTTP gateway not listening on {self.cfg.http_host}:{self.cfg.http_port}"
        raise StartupError(
            f"fleet not ready within ready_timeout_s={self.cfg.ready_timeout_s:g}s: {missing}; "
            "raise --ready-timeout or ready_timeout_s in the config"
        )

    def gateway_listening(self) -> bool:
        """True when the HTTP gateway accepts connections, or when it is off."""
        if not self.cfg.http_port:
            return True
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.cfg.http_host, self.cfg.http_host)
        try:
            socket.create_connection((host, self.cfg.http_port), timeout=0.5).close()
        except OSError:
            return False
        return True

    # ---- run ----------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        """Signal-safe: ask the run loop to drain and exit."""
        self.stop_event.set()

    def run(self) -> None:
        """Watch children until asked to stop; restart what dies, report to the broker and the collector."""
        while not self.models.wait(0.1):  # serves the control channel meanwhile
            changed = self.check_children()
            self.report(force=changed)
            self.kill_hung()
            self.report_metrics()

    def check_children(self) -> bool:
        """Restart exited children, respecting backoff and the intensity limit; True if anything changed."""
        now = time.monotonic()
        changed = False
        for child in self.children:
            if child.gave_up or child.alive or child.process is None:
                continue
            if child.last_exit is None:
                changed = True
                self._on_exit(child, now)
                if child.gave_up:
                    continue
            if now >= child.next_start_s:
                changed = True
                child.restarts += 1
                child.restart_times_s.append(now)
                child.last_exit = None
                child.start()
        return changed

    def _on_exit(self, child: Child, now: float) -> None:
        """Record an exit; schedule the restart, or give up past the intensity limit."""
        assert child.process is not None
        child.last_exit = child.process.exitcode
        if child.process.pid is not None:
            child.exited_pids.append(child.process.pid)
        if now - child.started_at_s >= self.cfg.restart_window_s:
            child.backoff_s = self.cfg.restart_backoff_s  # it had been stable: start the backoff over
        child.restart_times_s = [t for t in child.restart_times_s if now - t < self.cfg.restart_window_s]
        if len(child.restart_times_s) >= self.cfg.restart_max:
            child.gave_up = True
            log.error("%s exited (code %s) after %d restarts in %.0fs (restart_max=%d); giving up on it",
                      child.name, child.last_exit, len(child.restart_times_s), self.cfg.restart_window_s,
                      self.cfg.restart_max)
            if child.kind == "broker":
                self.failure = "the broker keeps exiting; the fleet cannot serve without it"
                self.stop_event.set()
            return
        child.next_start_s = now + child.backoff_s
        log.warning("%s exited with code %s; restarting in %.1fs", child.name, child.last_exit, child.backoff_s)
        child.backoff_s = min(child.backoff_s * 2, self.cfg.restart_backoff_max_s)

    def report(self, *, force: bool) -> None:
        """Send ``fleet_info`` to the broker when something changed, else every report_every_s."""
        now = time.monotonic()
        if self.reporter is None or (not force and now < self.next_report_s):
            return
        self.next_report_s = now + self.report_every_s
        self.reporter.send([c.report(now) for c in self.children])

    def kill_hung(self) -> None:
        """Kill workers the broker declared dead for silence that still run after hung_grace_s."""
        if self.reporter is None:
            return
        acks = self.reporter.acks()
        if not acks:
            return
        by_id = {c.worker_id: c for c in self.children if c.worker_id is not None}
        for silent in acks[-1].silent_workers:
            child = by_id.get(silent.get("worker_id"))
            age_s = silent.get("silent_for_s", 0.0)
            if child is None or child.process is None or not child.alive or child.process.pid != silent.get("pid"):
                continue
            if isinstance(age_s, (int, float)) and age_s >= self.cfg.hung_grace_s:
                log.error("%s (pid %d) has been silent for %.1fs (hung_grace_s=%g); killing it",
                          child.name, child.process.pid, age_s, self.cfg.hung_grace_s)
                child.process.kill()

    def report_metrics(self) -> None:
        """Send the workers' restart counts and liveness to the collector, on change and periodically."""
        if self.events is None:
            self.events = make_event_sender(events_addr(self.cfg.metrics_export, self.cfg.metrics_events), "supervisor")
        if not self.events.enabled:
            return
        workers = [{"worker": c.arg.worker_id, "model": c.arg.model, "restarts": c.restarts, "alive": c.alive,
                    "gave_up": c.gave_up} for c in self.children if c.kind == "worker"]
        now = time.monotonic()
        key = tuple(tuple(w.values()) for w in workers)
        if key == self._reported and now < self._next_report_s:
            return
        sent = self.events.send("supervisor", {"workers": workers})
        self._reported = key
        # A dropped report (collector not connected yet, or restarting) is retried soon.
        self._next_report_s = now + (METRICS_REFRESH_S if sent else 0.5)

    def restart_counts(self) -> dict[str, Any]:
        """Restarts and state per child, for status and metrics."""
        return {c.name: {"restarts": c.restarts, "alive": c.alive, "gave_up": c.gave_up,
                         "pid": c.process.pid if c.process else None} for c in self.children}

    # ---- stop ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Drain the broker and the gateway, then stop workers; kill whatever outlives its deadline."""
        front = [c for c in self.children if c.kind in ("broker", "gateway")]
        others = [c for c in self.children if c.kind not in ("broker", "gateway")]
        self._stop(front, self.cfg.drain_timeout_s + 5.0)
        self._stop(others, 10.0)
        if self.events is not None:
            self.events.close()
            self.events = None
        if self.reporter is not None:
            self.reporter.close()
            self.reporter = None
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
        if sup.failure is not None:
            log.error("stopping: %s", sup.failure)
            return 1
        log.info("stopping: draining in-flight requests (drain_timeout_s=%g)", cfg.drain_timeout_s)
        return 0
    except StartupError as exc:
        if sup.stop_event.is_set() and sup.failure is None:
            log.info("stopped while starting, as asked")
            return 0
        log.error("%s", exc)
        return 1
    finally:
        sup.shutdown()
