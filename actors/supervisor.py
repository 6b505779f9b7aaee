"""The supervisor behind `mlx-fleet up`: spawn, wait for ready, restart, drain.

SIGINT and SIGTERM drain the fleet and stop it. SIGHUP restarts the broker with a
handover (e.g. to pick up a new version): the broker exits at once, its requests
carry on in the workers, and the new broker takes them over.

It owns the children registry (:mod:`actors.children`) and drives it from one
loop: serve the control channel (:mod:`actors.control`), restart what exited,
reap retired workers, tell the broker what runs, and send the collector the
workers' restarts. Children are started with ``spawn`` and ask the kernel to
end them if the supervisor dies. A worker given up on stays listed and the rest
of the fleet keeps running; the broker is essential, so giving up on it stops
the fleet with an error.

The broker shows the children in `status`, forgets a worker as soon as its
process exits, and names workers it declared dead for silence or for no engine
progress (``hung_step_s``): one still running ``hung_grace_s`` later is hung, and
is killed and restarted.

A sharded replica (``shards`` > 1) is one child whose process is a
:class:`actors.shard_group.ProcessGroup`: its ranks, spawned together on a fresh
loopback ring, counted as one replica, and killed and restarted together when any
of them exits.

With ``metrics_export`` on, the collector is a child too, started first. It is
not on the serving path: start-up does not wait for it, and when it dies the
others' metric events are dropped until it is back.

The supervisor imports no entry point: the composition root hands it a
:class:`Wiring` (``mlx_fleet/wiring.py``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

from actors.children import BROKER, COLLECTOR, GATEWAY, ChildSpec, Children, Launch, RestartPolicy, WorkerSpec
from actors.clock import Clock, MonotonicClock
from actors.config import FleetConfig, shard_bounds
from actors.control import SupervisorLink, SupervisorState, SupervisorStateAck, prepare_runtime
from actors.curve import check_bind_policy
from actors.metrics import EventSender, NullSender, events_addr, make_event_sender
from actors.model_manager import ModelManager
from actors.proc import Process, spawn_child
from actors.shard_group import ProcessGroup, ShardRank, local_ring
from actors.protocol import Message
from actors.runtime import StartError

log = logging.getLogger("mlx_fleet.supervisor")

LOOP_S = 0.1  # the loop's pace: how soon an exit is noticed
READY_POLL_S = 0.2  # while starting: how often the broker is asked which workers registered
WORKER_EVENT_REFRESH_S = 2.0  # resend the workers' restarts this often (a restarted collector relearns them)


@dataclass(frozen=True)
class Wiring:
    """What the composition root gives a supervisor: its children's entry points, and two questions
    about model sources. Entry points must be module-level functions (``spawn`` pickles them by name)."""

    run_broker: Callable[[FleetConfig], None]
    run_worker: Callable[[WorkerSpec, FleetConfig], None]
    run_collector: Callable[[FleetConfig], None]
    run_gateway: Callable[[FleetConfig], None]
    check_source: Callable[[str], None]  # raises FileNotFoundError or ValueError for a source no worker could load
    weights_bytes: Callable[[str], int | None]  # estimated bytes of one replica's weights; None when unknown
    run_rank: Callable[[WorkerSpec, FleetConfig, ShardRank], None] | None = None  # one rank of a sharded group


class Supervisor:
    """Owns every child process of one fleet."""

    def __init__(self, cfg: FleetConfig, wiring: Wiring, *, clock: Clock | None = None,
                 launch: Launch | None = None) -> None:
        self.cfg = cfg
        self.wiring = wiring
        self.clock = clock or MonotonicClock()
        self.children = Children(launch or self._launch, self.clock, RestartPolicy.from_config(cfg))
        if cfg.metrics_export:
            self.children.add(ChildSpec.service(COLLECTOR))
        self.children.add(ChildSpec.service(BROKER))
        self.models = ModelManager(cfg, self.children, check_source=wiring.check_source,
                                   weights_bytes=wiring.weights_bytes)
        self.models.add_configured()
        if cfg.http_port:
            self.children.add(ChildSpec.service(GATEWAY))
        self.stop_event = threading.Event()
        self.broker_restart = threading.Event()  # a planned restart of the broker was asked for (SIGHUP)
        self.failure: str | None = None  # set when the fleet cannot go on (the broker was given up)
        self.child_cfg: FleetConfig | None = None  # the children's config, with the runtime folder (open())
        self.link: SupervisorLink | None = None
        self.events: EventSender | NullSender | None = None
        self.registered: frozenset[str] = frozenset()  # worker ids registered with the broker, from its last ack
        self.state_every_s = min(1.0, cfg.heartbeat_interval_s)
        self._next_state_s = 0.0
        self._worker_event_key: tuple[Any, ...] = ()
        self._next_worker_event_s = 0.0

    # ---- start ----------------------------------------------------------------------

    def open(self) -> FleetConfig:
        """Make the runtime folder (and local CurveZMQ keys), bind the control socket; idempotent.

        Constructing a supervisor has no side effects; ``start`` (or the first child started) opens it.
        """
        if self.child_cfg is None:
            self.child_cfg = prepare_runtime(self.cfg)
            self.link = SupervisorLink(self.child_cfg.runtime_dir)
            # Connect early, so the first event is not dropped.
            self.events = make_event_sender(events_addr(self.cfg.metrics_export, self.cfg.metrics_events),
                                            "supervisor")
        return self.child_cfg

    def _launch(self, spec: ChildSpec) -> Process:
        """Spawn one child with the entry point the wiring names for its kind."""
        cfg = self.open()
        if spec.worker is not None and spec.worker.shards > 1:
            return self._launch_group(spec.name, spec.worker, cfg)
        if spec.worker is not None:
            return spawn_child(spec.name, self.wiring.run_worker, (spec.worker, cfg))
        entry = {BROKER: self.wiring.run_broker, COLLECTOR: self.wiring.run_collector,
                 GATEWAY: self.wiring.run_gateway}[spec.kind]
        return spawn_child(spec.name, entry, (cfg,))

    def _launch_group(self, name: str, worker: WorkerSpec, cfg: FleetConfig) -> ProcessGroup:
        """Spawn the ranks of a sharded replica on a fresh loopback ring, as one process."""
        if self.wiring.run_rank is None:
            raise RuntimeError(f"{name}: this fleet's wiring cannot run sharded workers")
        ring = local_ring(worker.shards)
        procs: list[Process] = []
        try:
            for rank in range(worker.shards):
                shard = ShardRank(rank, ring, **shard_bounds(cfg, worker.shard_mode))
                procs.append(spawn_child(f"{name}/rank{rank}", self.wiring.run_rank, (worker, cfg, shard)))
        except BaseException:
            for proc in procs:
                proc.kill()
            raise
        log.info("%s: started a group of %d ranks (pids %s)", name, len(procs), ", ".join(str(p.pid) for p in procs))
        return ProcessGroup(procs)

    def start(self) -> None:
        """Spawn everything not yet running and wait until every replica has registered with the broker."""
        for warning in check_bind_policy(self.cfg):
            log.warning("%s", warning)
        problem = self.models.startup_problem()
        if problem:
            raise StartError(problem)
        self.open()
        self.children.start_all()
        self.wait_ready()

    def wait_ready(self) -> None:
        """Until all replicas are registered (the broker's acks say which), or fail naming the setting."""
        want = {m.name: m.replicas for m in self.cfg.models if not m.on_demand}
        deadline_s = self.clock.now() + self.cfg.ready_timeout_s
        have: dict[str, int] = {}
        while self.clock.now() < deadline_s:
            if self.stop_event.is_set():
                raise StartError("interrupted while starting")
            for child in self.children:
                if child.kind != COLLECTOR and child.process is not None and not child.alive:
                    code = child.process.exitcode
                    raise StartError(f"{child.name} exited with code {code} during start-up (see its log above)")
            self.send_state(force=True)
            self.serve(READY_POLL_S)
            have = {name: sum(1 for c in self.children.workers(name) if c.worker_id in self.registered)
                    for name in want}
            if all(have[n] >= want[n] for n in want) and self.gateway_listening():
                return
        missing = ", ".join(f"{n} ({have.get(n, 0)}/{want[n]})" for n in want if have.get(n, 0) < want[n])
        if not missing:
            missing = f"HTTP gateway not listening on {self.cfg.http_host}:{self.cfg.http_port}"
        raise StartError(
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

    def request_broker_restart(self, *_: Any) -> None:
        """Signal-safe: restart the broker with a handover (its running requests carry on), e.g. after an upgrade."""
        self.broker_restart.set()

    def run(self) -> None:
        """Watch children until asked to stop: serve the broker's calls, restart, reap, tell the broker."""
        while not self.stop_event.is_set():
            self.serve(LOOP_S)
            if self.broker_restart.is_set():
                self.broker_restart.clear()
                if self.children.hand_over(BROKER):
                    log.info("restarting the broker: it hands its running requests over to the next one")
            changed = self.check_children()
            self.children.reap()
            self.send_state(force=changed)
            self.send_worker_event()

    def serve(self, timeout_s: float) -> None:
        """Handle what the broker sends for ``timeout_s`` (calls, acks); just wait when there is no link."""
        if self.link is None:
            self.stop_event.wait(timeout_s)
            return
        deadline_s = self.clock.now() + timeout_s
        while not self.stop_event.is_set():
            left_s = deadline_s - self.clock.now()
            if left_s <= 0 or not self.link.poll(left_s):
                return
            for msg in self.link.receive():
                self.handle(msg)

    def handle(self, msg: Message) -> None:
        """One message from the broker: an ack of our state, or a call to answer."""
        if isinstance(msg, SupervisorStateAck):
            self.registered = frozenset(msg.registered)
            self.kill_hung(msg.silent_workers)
            return
        if self.link is not None:
            self.link.send(self.models.handle(msg))
        self._next_state_s = 0.0  # tell the broker about the change at once

    def check_children(self) -> bool:
        """Restart exited children; stop the fleet when the broker was given up on. True if anything changed."""
        changed = self.children.check()
        broker = self.children.get(BROKER)
        if broker is not None and broker.gave_up and self.failure is None:
            self.failure = "the broker keeps exiting; the fleet cannot serve without it"
            self.stop_event.set()
        return bool(changed)

    def state(self) -> SupervisorState:
        """What the supervisor runs, as the broker is told."""
        now = self.clock.now()
        return SupervisorState(children=[c.view(now) for c in self.children], models=self.models.models_view(),
                               memory=self.models.memory_view(), supervisor_pid=os.getpid())

    def send_state(self, *, force: bool) -> None:
        """Send the state to the broker when something changed, else every ``state_every_s``."""
        now = self.clock.now()
        if self.link is None or (not force and now < self._next_state_s):
            return
        self._next_state_s = now + self.state_every_s
        self.link.send(self.state())

    def kill_hung(self, silent_workers: list[dict[str, Any]]) -> None:
        """Kill workers the broker declared dead (silent, or hung with no engine progress) still running after hung_grace_s."""
        for silent in silent_workers:
            child = self.children.by_worker_id(silent.get("worker_id"))
            age_s = silent.get("silent_for_s", 0.0)
            if child is None or not child.alive or child.pid != silent.get("pid"):
                continue
            if isinstance(age_s, (int, float)) and age_s >= self.cfg.hung_grace_s:
                log.error("%s (pid %s) was declared silent or hung %.1fs ago (hung_grace_s=%g); killing it",
                          child.name, child.pid, age_s, self.cfg.hung_grace_s)
                self.children.kill(child)

    def send_worker_event(self) -> None:
        """Send the workers' restart counts and liveness to the collector, on change and periodically."""
        if self.events is None or not self.events.enabled:
            return
        workers = [{"worker": c.worker_id, "model": c.model, "restarts": c.restarts, "alive": c.alive,
                    "gave_up": c.gave_up} for c in self.children.workers()]
        now = self.clock.now()
        key = tuple(tuple(w.values()) for w in workers)
        if key == self._worker_event_key and now < self._next_worker_event_s:
            return
        sent = self.events.send("supervisor", {"workers": workers})
        self._worker_event_key = key
        # A dropped event (collector not connected yet, or restarting) is retried soon.
        self._next_worker_event_s = now + (WORKER_EVENT_REFRESH_S if sent else 0.5)

    # ---- stop ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Drain the broker and the gateway, then stop workers; kill whatever outlives its deadline (idempotent)."""
        front = [c for c in self.children if c.kind in (BROKER, GATEWAY)]
        others = [c for c in self.children if c.kind not in (BROKER, GATEWAY)]
        self.children.stop(front, self.cfg.drain_timeout_s + 5.0)
        self.children.stop(others, 10.0)
        self.children.close()
        if self.events is not None:
            self.events.close()
            self.events = None
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.child_cfg is not None and self.child_cfg.runtime_dir != self.cfg.runtime_dir:
            shutil.rmtree(self.child_cfg.runtime_dir, ignore_errors=True)


def run_fleet(sup: Supervisor, *, on_ready: Callable[[], None] | None = None) -> int:
    """Run a fleet in the foreground until SIGINT/SIGTERM; returns the exit code."""
    signal.signal(signal.SIGINT, sup.request_stop)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGHUP, sup.request_broker_restart)
    try:
        sup.start()
        if on_ready is not None:
            on_ready()
        sup.run()
        if sup.failure is not None:
            log.error("stopping: %s", sup.failure)
            return 1
        log.info("stopping: draining in-flight requests (drain_timeout_s=%g)", sup.cfg.drain_timeout_s)
        return 0
    except StartError as exc:
        if sup.stop_event.is_set() and sup.failure is None:
            log.info("stopped while starting, as asked")
            return 0
        log.error("%s", exc)
        return 1
    finally:
        sup.shutdown()
