"""Runtime model management in the broker: load, unload with drain, on-demand models.

Pure like :mod:`broker.state`: a clock, no sockets; handlers return :class:`Out`
lists. Outs addressed to ``Dest.CONTROL`` go to the supervisor over the control
channel (:mod:`actors.control`); the supervisor starts and stops processes, this
object decides when. The supervisor's state message also arrives here: it keeps
the configured models in step with what the supervisor runs.

- ``load``: forwarded to the supervisor; on its reply the model becomes
  configured (requests queue for it) and the client gets ``control_reply``.
- ``unload``: new requests get ``unknown_model`` at once; queued and running ones
  still finish. When none is left (or ``drain_timeout_s`` passes) its workers are
  retired and the supervisor stops them and forgets the model.
- on-demand: the first request of a model with no worker asks the supervisor to
  ``start`` it (the request waits in the queue); after ``idle_unload_s`` with
  nothing queued or running, its workers are retired and stopped.

A retired worker gets no new requests, and its ``ready`` is ignored if it comes
back, so a process on its way out never rejoins.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from actors.clock import Clock
from actors.config import DTYPES
from actors.control import Start, Stop, SupervisorState
from actors.protocol import BAD_REQUEST, UNAVAILABLE, Addressed, ControlReply, Error, Load, Message, Ready, Unload
from broker.records import Dest, ModelRecord, Out, WorkerRecord
from broker.state import BrokerState

log = logging.getLogger("mlx_fleet.broker")


@dataclass
class Call:
    """A control call in flight to the supervisor, and whom to answer."""

    key: str
    op: str  # load | unload | start | idle
    model: str
    deadline_s: float
    client: bytes | None = None
    client_rid: str | None = None
    load: Load | None = None


@dataclass
class ModelLife:
    """The lifecycle of one model, beside its routing record."""

    name: str
    on_demand: bool = False
    idle_unload_s: float = 300.0
    starting: bool = False  # an on-demand start is under way and no worker has registered yet
    last_busy_s: float = 0.0
    unloading: Call | None = None  # the client's unload, until its workers are stopped
    drain_deadline_s: float = 0.0


@dataclass
class ModelControl:
    """Decides when models start and stop; owns nothing but this bookkeeping."""

    state: BrokerState
    clock: Clock
    supervised: bool = True  # a supervisor listens on the control channel
    on_demand: dict[str, float] = field(default_factory=dict)  # name -> idle_unload_s
    drain_timeout_s: float = 30.0
    call_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        now = self.clock.now()
        self.lives: dict[str, ModelLife] = {
            name: ModelLife(name, True, idle_s, last_busy_s=now) for name, idle_s in self.on_demand.items()
        }
        self.calls: dict[str, Call] = {}
        self.retired: set[str] = set()  # worker ids that must not register again
        self._keys = itertools.count(1)

    def life(self, name: str) -> ModelLife:
        """The lifecycle record of ``name`` (created on first use)."""
        if name not in self.lives:
            self.lives[name] = ModelLife(name, last_busy_s=self.clock.now())
        return self.lives[name]

    def _call(self, op: str, model: str, body: Addressed, **kw: Any) -> list[Out]:
        key = f"ctl{next(self._keys)}"
        body.request_id = key
        self.calls[key] = Call(key, op, model, self.clock.now() + self.call_timeout_s, **kw)
        return [Out(Dest.CONTROL, b"", body)]

    def _live(self, name: str) -> list[WorkerRecord]:
        return [w for w in self.state.live_workers(name) if not w.retiring]

    # ---- client calls ------------------------------------------------------------------

    def handle_load(self, client: bytes, msg: Load) -> list[Out]:
        """Forward a valid load to the supervisor; refuse one that cannot work."""
        problem = _load_problem(msg)
        if problem:
            return [Out(Dest.CLIENT, client, Error(BAD_REQUEST, f"load: {problem}", msg.request_id))]
        if not self.supervised:
            return [Out(Dest.CLIENT, client, Error(UNAVAILABLE, "load needs the supervisor (`mlx-fleet up`)", msg.request_id))]
        m = self.state.models.get(msg.model)
        busy = any(c.model == msg.model and c.op in ("load", "unload") for c in self.calls.values())
        life = self.lives.get(msg.model)
        if busy or (life is not None and life.unloading) or (
                m is not None and m.accepting and (m.configured or self._live(msg.model))):
            text = f"model {msg.model!r} is already served or changing; unload it first"
            return [Out(Dest.CLIENT, client, Error(BAD_REQUEST, text, msg.request_id))]
        forward = Load(model=msg.model, source=msg.source, replicas=msg.replicas, on_demand=msg.on_demand,
                       idle_unload_s=msg.idle_unload_s)
        return self._call("load", msg.model, forward, client=client, client_rid=msg.request_id, load=msg)

    def handle_unload(self, client: bytes, msg: Unload) -> list[Out]:
        """Stop taking requests for a model and drain it; its workers stop when it is empty."""
        m = self.state.models.get(msg.model)
        life = self.lives.get(msg.model)
        if m is None or not m.accepting or (not m.configured and not self._live(msg.model)):
            return [Out(Dest.CLIENT, client, self.state.unknown_model(msg.model, msg.request_id))]
        if life is not None and life.unloading:
            return [Out(Dest.CLIENT, client, Error(BAD_REQUEST, f"model {msg.model!r} is already unloading", msg.request_id))]
        life = self.life(msg.model)
        m.accepting = False
        life.unloading = Call("", "unload", msg.model, 0.0, client, msg.request_id)
        life.drain_deadline_s = self.clock.now() + self.drain_timeout_s
        log.info("unloading %s: draining %d queued and %d running requests", msg.model, len(m.queue),
                 sum(len(w.running) for w in self.state.live_workers(msg.model)))
        return self._progress_unload(life)

    def _progress_unload(self, life: ModelLife) -> list[Out]:
        """Once the model has nothing queued or running (or the drain deadline passed), stop it."""
        assert life.unloading is not None
        m = self.state.models[life.name]
        workers = self.state.live_workers(life.name)
        running = sum(len(w.running) for w in workers)
        now = self.clock.now()
        if (len(m.queue) or running) and now < life.drain_deadline_s:
            return []
        out: list[Out] = []
        for key, rec in list(m.queue.ordered()):
            text = f"model {life.name!r} was unloaded (drain_timeout_s={self.drain_timeout_s:g}) before this request started"
            out += self.state.finish(rec, Error(UNAVAILABLE, text, key))
        ids = self.retire(life.name)
        m.configured = False
        pending, life.unloading = life.unloading, None
        if not self.supervised:
            self.lives.pop(life.name, None)
            return out + [Out(Dest.CLIENT, pending.client or b"", ControlReply("unload", life.name, "unloaded", ids, pending.client_rid))]
        return out + self._call("unload", life.name, Stop("", life.name, forget=True),
                                client=pending.client, client_rid=pending.client_rid)

    def retire(self, name: str) -> list[str]:
        """Mark every worker of ``name`` as leaving: no new requests, no coming back."""
        ids = []
        for w in self.state.live_workers(name):
            w.retiring = True
            self.retired.add(w.worker_id)
            ids.append(w.worker_id)
        return ids

    # ---- on-demand ----------------------------------------------------------------------

    def after_generate(self, name: str) -> list[Out]:
        """A request for ``name`` was queued: start its workers if it is on-demand and cold."""
        life = self.lives.get(name)
        m = self.state.models.get(name)
        if life is None or not life.on_demand or life.starting or life.unloading or m is None:
            return []
        if not len(m.queue) or self._live(name) or not m.accepting:
            return []
        life.starting = True
        m.no_worker_since_s = self.clock.now()  # the no-worker timeout counts from the start
        log.info("on-demand model %s has a request waiting; starting it", name)
        return self._call("start", name, Start("", name))

    def accept_ready(self, msg: Ready) -> bool:
        """False for a retired worker (ignored); else note the model is up."""
        if msg.worker_id in self.retired:
            log.info("ignoring ready from retired worker %s", msg.worker_id)
            return False
        life = self.lives.get(msg.model)
        if life is not None:
            life.starting = False
            life.last_busy_s = self.clock.now()
        return True

    # ---- the supervisor's answers ---------------------------------------------------------

    def handle_control(self, msg: Message) -> list[Out]:
        """A reply to one of our calls, or the supervisor's state (kept by the state, acked)."""
        if isinstance(msg, SupervisorState):
            out = self.state.handle_supervisor_state(msg)
            if self.state.supervisor is not None:
                self._sync(self.state.supervisor.models)
            return out
        key = msg.request_id if isinstance(msg, Addressed) else None
        call = self.calls.pop(key, None) if isinstance(key, str) else None
        if call is None:
            return []
        ok = isinstance(msg, ControlReply)
        if call.op == "load" and ok and call.load is not None:
            self._configure(call.load)
            log.info("loaded %s from %s (%s)", call.model, call.load.source, msg.message)  # type: ignore[attr-defined]
        elif call.op == "unload" and ok:
            self.lives.pop(call.model, None)
            log.info("unloaded %s", call.model)
        elif call.op == "start" and not ok:
            return self._start_failed(call.model, msg)
        if call.client is None:
            if not ok:
                log.warning("supervisor refused %s of %s: %s", call.op, call.model, getattr(msg, "message", ""))
            return []
        body = msg.to_map()
        body["request_id"] = call.client_rid
        return [Out(Dest.CLIENT, call.client, body)]

    def _configure(self, load: Load) -> None:
        m = self.state.ensure_model(load.model)
        m.configured, m.accepting = True, True
        m.no_worker_since_s = self.clock.now()
        life = self.life(load.model)
        life.on_demand = load.on_demand
        life.last_busy_s = self.clock.now()
        if load.idle_unload_s is not None:
            life.idle_unload_s = load.idle_unload_s

    def _start_failed(self, name: str, msg: Message) -> list[Out]:
        """An on-demand start was refused: its waiting requests get that error."""
        life = self.life(name)
        life.starting = False
        m = self.state.models.get(name)
        code, text = getattr(msg, "code", UNAVAILABLE), getattr(msg, "message", "start failed")
        out: list[Out] = []
        for key, rec in list(m.queue.ordered()) if m else []:
            out += self.state.finish(rec, Error(code, f"could not start on-demand model {name!r}: {text}", key))
        return out

    def _sync(self, models: list[dict[str, Any]]) -> None:
        """Make the configured models match what the supervisor runs (after a broker restart too)."""
        names = set()
        for spec in models:
            name = spec.get("name")
            if not isinstance(name, str):
                continue
            names.add(name)
            life = self.lives.get(name)
            if life is not None and life.unloading:
                continue
            m = self.state.ensure_model(name)
            m.configured, m.accepting = True, True
            life = self.life(name)
            life.on_demand = bool(spec.get("on_demand", False))
            life.idle_unload_s = float(spec.get("idle_unload_s", life.idle_unload_s))
        pending = {c.model for c in self.calls.values() if c.op == "load"}
        for name, m in self.state.models.items():
            if m.configured and name not in names and name not in pending:
                m.configured = False

    # ---- time ---------------------------------------------------------------------------

    def tick(self) -> list[Out]:
        """Drain unloads, stop idle on-demand models, start cold ones with waiting work, expire calls."""
        now = self.clock.now()
        out: list[Out] = []
        for life in list(self.lives.values()):
            m = self.state.models.get(life.name)
            if m is None:
                continue
            if life.unloading:
                out += self._progress_unload(life)
            elif life.on_demand and m.accepting:
                out += self._idle_check(life, m, now) + self.after_generate(life.name)
        for key in [k for k, c in self.calls.items() if c.deadline_s <= now]:
            call = self.calls.pop(key)
            if call.op == "start":
                self.life(call.model).starting = False
            if call.client is not None:
                text = f"the supervisor did not answer {call.op} within {self.call_timeout_s:g}s"
                out.append(Out(Dest.CLIENT, call.client, Error(UNAVAILABLE, text, call.client_rid)))
        self._forget_empty()
        return out

    def _idle_check(self, life: ModelLife, m: ModelRecord, now: float) -> list[Out]:
        live = self._live(life.name)
        if not live or life.starting:
            return []
        if len(m.queue) or any(w.running for w in live):
            life.last_busy_s = now
            return []
        if now - life.last_busy_s < life.idle_unload_s:
            return []
        log.info("on-demand model %s idle for %.0fs; stopping its workers", life.name, now - life.last_busy_s)
        self.retire(life.name)
        return self._call("idle", life.name, Stop("", life.name, forget=False))

    def _forget_empty(self) -> None:
        """Drop the routing record of an unloaded model once nothing of it is left."""
        for name, m in list(self.state.models.items()):
            if m.accepting or len(m.queue) or self.state.live_workers(name):
                continue
            if any(r.request.model == name for r in self.state.requests.values()):
                continue
            if name in self.lives and self.lives[name].unloading:
                continue
            self.state.forget_model(name)


def _load_problem(msg: Load) -> str:
    """What is wrong with a load request's values, or ''."""
    if not msg.model or msg.model != msg.model.strip() or "/" in msg.model:
        return "model must be a non-empty name without '/' or surrounding spaces"
    if not msg.source or len(msg.source) > 4096:
        return "source must hold 1..4096 characters"
    if not 0 <= msg.replicas <= 64:
        return "replicas must be in 0..64"
    if msg.idle_unload_s is not None and not 0.0 < msg.idle_unload_s <= 30 * 86_400.0:
        return "idle_unload_s must be in (0, 2592000]"
    if msg.dtype is not None and msg.dtype not in DTYPES:
        return f"dtype must be one of {', '.join(DTYPES)}"
    return ""
