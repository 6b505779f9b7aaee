"""The supervisor's side of runtime model management: start and stop worker processes.

The broker decides when (``broker/lifecycle.py``); this object does it, over the
control channel (``actors/control.py``). It keeps the models the supervisor runs,
checks the memory budget, spawns workers with fresh ids, and stops retired ones
without blocking the supervisor's loop.

Worker ids are ``NAME-i`` for the first generation of a model and ``NAME-i.G``
after that, so a process that is still on its way out never shares an id (and a
ZeroMQ identity) with its successor.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

import zmq

from actors.config import FleetConfig, ModelSpec
from actors.control import CONTROL_TYPES, TO_SUPERVISOR, FleetReport, Start, Stop, control_addr, make_runtime_dir
from actors.curve import make_local_keys
from actors.protocol import (
    BAD_REQUEST, INTERNAL, OVER_BUDGET, UNKNOWN_MODEL, ControlReply, Error, Load, Message, ProtocolError,
    encode, from_map, unpack_frames,
)
from actors.sockets import make_socket

if TYPE_CHECKING:
    from actors.supervisor import Child, Supervisor

log = logging.getLogger("mlx_fleet.supervisor")

REPORT_INTERVAL_S = 1.0
STOP_GRACE_S = 10.0  # a stopped worker gets this long to tear down before it is killed
MIB = 1024 * 1024


def prepare_runtime(cfg: FleetConfig) -> FleetConfig:
    """Give a fleet its private runtime folder (control socket, local worker keys)."""
    if cfg.runtime_dir:
        return cfg
    runtime_dir = make_runtime_dir()
    if cfg.curve_server_secret:
        make_local_keys(runtime_dir)
    return dataclasses.replace(cfg, runtime_dir=runtime_dir)


def localize(ws: Any, cfg: FleetConfig) -> Any:
    """Worker settings for a local child: with curve on, the supervisor's key and the broker's cert."""
    if not cfg.curve_server_secret:
        return ws
    secret = os.path.join(cfg.runtime_dir, "local.key_secret")
    return dataclasses.replace(ws, curve_secret=secret, curve_server_public=cfg.curve_server_secret)


def fmt_bytes(n: int) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n / MIB:.1f} MiB"


def budget_verdict(*, budget_bytes: int, loaded_bytes: int, each_bytes: int | None, replicas: int, what: str) -> str:
    """Why ``replicas`` x ``each_bytes`` more would not fit ``budget_bytes`` (0: no limit), or ''."""
    if not budget_bytes or replicas == 0:
        return ""
    if each_bytes is None:
        return (f"{what} refused: cannot estimate its size (no *.safetensors on disk), "
                f"and memory_budget_bytes={budget_bytes} is set")
    need = each_bytes * replicas
    if loaded_bytes + need <= budget_bytes:
        return ""
    return (f"{what} refused: it needs an estimated {fmt_bytes(need)} ({replicas} x {fmt_bytes(each_bytes)} of "
            f"*.safetensors), {fmt_bytes(loaded_bytes)} is already loaded, and memory_budget_bytes is "
            f"{fmt_bytes(budget_bytes)} ({budget_bytes} bytes)")


class ModelManager:
    """Models the supervisor runs, the control socket, retiring children and the budget."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.cfg = sup.cfg
        self.specs: dict[str, ModelSpec] = {m.name: m for m in self.cfg.models}
        self.generations: dict[str, int] = {m.name: 0 for m in self.cfg.models if not m.on_demand}
        self.retiring: list[tuple["Child", float]] = []
        self._weights: dict[str, int | None] = {}
        self._next_report_s = 0.0
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None

    def open(self) -> None:
        """Make the runtime folder (and local keys), give it to every child, bind the control socket.

        Called by ``Supervisor.start``: constructing a supervisor has no side effects.
        """
        if self.sock is not None:
            return
        old = self.sup.cfg
        self.sup.cfg = self.cfg = cfg = prepare_runtime(old)
        for child in self.sup.children:
            if child.arg is old:  # broker (and any other child that takes the fleet config)
                child.arg = cfg
            elif child.kind == "worker":
                child.arg = localize(child.arg, cfg)
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER)
        self.sock.bind(control_addr(cfg.runtime_dir))

    # ---- the loop ---------------------------------------------------------------------

    def wait(self, timeout_s: float) -> bool:
        """Serve control messages for up to ``timeout_s``; True once the supervisor should stop."""
        if self.sock is None:
            return self.sup.stop_event.wait(timeout_s)
        if self.sup.stop_event.is_set():
            return True
        if self.sock.poll(timeout_s * 1000.0):
            while self.sock.poll(0):
                self.handle(self.sock.recv_multipart())
        self.reap()
        self.report()
        return self.sup.stop_event.is_set()

    def handle(self, frames: list[bytes]) -> None:
        """One call from the broker; every call gets one reply."""
        try:
            msg = from_map(unpack_frames(frames), allowed=TO_SUPERVISOR, registry=CONTROL_TYPES)
        except ProtocolError as exc:
            log.warning("dropped malformed control message: %s", exc.message)
            return
        try:
            reply = self.dispatch(msg)
        except Exception as exc:  # a failed call answers with an error; the supervisor goes on
            log.exception("control call %s failed", msg.TYPE)
            reply = Error(INTERNAL, f"{msg.TYPE} failed: {type(exc).__name__}: {exc}")
        reply.request_id = getattr(msg, "request_id", None)
        self.send(reply)
        self._next_report_s = 0.0  # report the change at once

    def dispatch(self, msg: Message) -> Message:
        """Run one call: load, start or stop."""
        if isinstance(msg, Load):
            return self.load(msg)
        if isinstance(msg, Start):
            return self.start(msg.model)
        assert isinstance(msg, Stop)
        return self.stop(msg.model, forget=msg.forget)

    def send(self, msg: Message) -> None:
        """To the broker, never blocking (with no broker connected it is dropped)."""
        if self.sock is None:
            return
        try:
            self.sock.send_multipart(encode(msg), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ---- calls -----------------------------------------------------------------------

    def load(self, msg: Load) -> Message:
        """Add a model and start its replicas (none yet when on-demand)."""
        from workers.models import check_source

        if msg.model in self.specs:
            return Error(BAD_REQUEST, f"model {msg.model!r} is already loaded")
        try:
            check_source(msg.source)
        except (FileNotFoundError, ValueError) as exc:
            return Error(BAD_REQUEST, str(exc))
        spec = ModelSpec(msg.model, msg.source, msg.replicas, self.cfg.batching, msg.on_demand,
                         msg.idle_unload_s if msg.idle_unload_s is not None else ModelSpec.idle_unload_s)
        if spec.on_demand:
            self.specs[spec.name] = spec
            return ControlReply("load", spec.name, "on demand: starts at its first request")
        problem = self.budget_problem(spec.source, spec.replicas, f"load {spec.name}")
        if problem:
            return Error(OVER_BUDGET, problem)
        self.specs[spec.name] = spec
        ids = self.spawn(spec, spec.replicas)
        return ControlReply("load", spec.name, f"starting {len(ids)} replica(s)", ids)

    def start(self, name: str) -> Message:
        """Start an on-demand model's replicas (nothing to do if they run)."""
        spec = self.specs.get(name)
        if spec is None:
            return Error(UNKNOWN_MODEL, f"model {name!r} is not loaded")
        if self.children_of(name):
            return ControlReply("start", name, "already running")
        count = max(1, spec.replicas)
        problem = self.budget_problem(spec.source, count, f"start {name}")
        if problem:
            return Error(OVER_BUDGET, problem)
        ids = self.spawn(spec, count)
        return ControlReply("start", name, f"starting {len(ids)} replica(s)", ids)

    def stop(self, name: str, *, forget: bool) -> Message:
        """Stop a model's worker processes (SIGTERM now, SIGKILL after STOP_GRACE_S)."""
        if forget:
            self.specs.pop(name, None)  # a model served only by remote workers has no spec here
        ids = []
        now = time.monotonic()
        for child in self.children_of(name, include_failed=True):
            self.sup.children.remove(child)
            if child.process is not None and child.process.is_alive():
                child.process.terminate()
                self.retiring.append((child, now + STOP_GRACE_S))
            ids.append(child.arg.worker_id)
        log.info("%s %s: stopping %s", "unload" if forget else "idle stop", name, ", ".join(ids) or "no workers")
        return ControlReply("unload" if forget else "stop", name, f"stopping {len(ids)} worker(s)", ids)

    # ---- processes -------------------------------------------------------------------

    def children_of(self, name: str, *, include_failed: bool = False) -> list["Child"]:
        """The supervised worker children of model ``name``."""
        return [c for c in self.sup.children if c.kind == "worker" and c.arg.model == name
                and (include_failed or not c.gave_up)]

    def spawn(self, spec: ModelSpec, count: int) -> list[str]:
        """Start ``count`` workers of ``spec`` under a new generation of ids."""
        from actors.supervisor import Child, worker_settings
        from workers.worker import run_worker

        gen = self.generations.get(spec.name, -1) + 1
        self.generations[spec.name] = gen
        one = dataclasses.replace(spec, replicas=count, on_demand=False)
        ids = []
        for i, ws in enumerate(worker_settings(dataclasses.replace(self.cfg, models=(one,)))):
            wid = f"{spec.name}-{i}" if gen == 0 else f"{spec.name}-{i}.{gen}"
            ws = localize(dataclasses.replace(ws, worker_id=wid), self.cfg)
            child = Child(f"worker:{wid}", "worker", run_worker, ws, worker_id=wid, model=spec.name,
                          backoff_s=self.cfg.restart_backoff_s)
            self.sup.children.append(child)
            child.start()
            ids.append(wid)
        return ids

    def reap(self) -> None:
        """Forget stopped children that exited; kill those past their grace period."""
        now = time.monotonic()
        still = []
        for child, deadline_s in self.retiring:
            proc = child.process
            if proc is None or not proc.is_alive():
                if proc is not None:
                    proc.join(0)
                continue
            if now >= deadline_s:
                log.warning("%s did not stop in %.0fs; killing it", child.name, STOP_GRACE_S)
                proc.kill()
            still.append((child, deadline_s))
        self.retiring = still

    # ---- the budget ----------------------------------------------------------------------

    def weights(self, source: str) -> int | None:
        """Estimated bytes of one replica of ``source`` (its *.safetensors), cached."""
        if source not in self._weights:
            from workers.models import weights_bytes

            self._weights[source] = weights_bytes(source)
        return self._weights[source]

    def loaded_bytes(self) -> int:
        """The estimated weights of every worker child that has not been given up on."""
        return sum(self.weights(c.arg.source) or 0 for c in self.sup.children if c.kind == "worker" and not c.gave_up)

    def budget_problem(self, source: str, replicas: int, what: str) -> str:
        """Why ``replicas`` more of ``source`` would not fit memory_budget_bytes, or ''."""
        budget = self.cfg.memory_budget_bytes
        if not budget or replicas == 0:
            return ""
        return budget_verdict(budget_bytes=budget, loaded_bytes=self.loaded_bytes(), each_bytes=self.weights(source),
                              replicas=replicas, what=f"{what} ({source!r})")

    def startup_problem(self) -> str:
        """Why the configured models do not fit the memory budget, or ''."""
        if not self.cfg.memory_budget_bytes:
            return ""
        total = 0
        for spec in self.specs.values():
            if spec.on_demand or spec.replicas == 0:
                continue
            each = self.weights(spec.source)
            if each is None:
                return f"cannot estimate the size of model {spec.name} ({spec.source!r}) for memory_budget_bytes"
            total += each * spec.replicas
        if total > self.cfg.memory_budget_bytes:
            return (f"the configured models need an estimated {fmt_bytes(total)} of weights, over "
                    f"memory_budget_bytes={self.cfg.memory_budget_bytes} ({fmt_bytes(self.cfg.memory_budget_bytes)})")
        return ""

    # ---- reporting ---------------------------------------------------------------------------

    def report(self) -> None:
        """Tell the broker what runs (every REPORT_INTERVAL_S, and at once after a change)."""
        now = time.monotonic()
        if now < self._next_report_s:
            return
        self._next_report_s = now + REPORT_INTERVAL_S
        models = [{"name": s.name, "source": s.source, "replicas": s.replicas, "on_demand": s.on_demand,
                   "idle_unload_s": s.idle_unload_s} for s in self.specs.values()]
        workers = [{"worker_id": c.arg.worker_id, "model": c.arg.model, "alive": c.alive, "restarts": c.restarts,
                    "gave_up": c.gave_up, "pid": c.process.pid if c.process else None}
                   for c in self.sup.children if c.kind == "worker"]
        budget = self.cfg.memory_budget_bytes
        memory = {"budget_bytes": budget, "loaded_bytes": self.loaded_bytes() if budget else None}
        self.send(FleetReport(models=models, workers=workers, memory=memory))

    def close(self) -> None:
        """Stop what is still retiring, close the socket, remove the runtime folder (idempotent)."""
        self.sup._stop([c for c, _ in self.retiring], STOP_GRACE_S)
        self.retiring = []
        if self.sock is None or self.ctx is None:
            return
        self.sock.close(0)
        self.ctx.term()
        self.sock = self.ctx = None
        shutil.rmtree(self.cfg.runtime_dir, ignore_errors=True)
