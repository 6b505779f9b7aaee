"""The broker's routing, queueing and liveness state: pure, no sockets, a clock.

The records it keeps live in :mod:`broker.records`; the `status` view is built
from it by :mod:`broker.status`.

Every handler returns a list of :class:`Out` (who to send what); the broker
actor only moves bytes. Requests get broker-side keys (``<key_prefix><N>``) so that
two clients may use the same request_id; replies are rewritten back. The broker
gives each of its processes its own prefix, so that its keys never collide with
those of requests adopted from an earlier broker (:mod:`broker.adoption`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from typing import Any, Sequence

from actors.clock import Clock
from actors.control import SupervisorState, SupervisorStateAck
from actors.protocol import (
    CANCEL_BROKER_EXIT, DUPLICATE_REQUEST, OVERLOADED, UNAVAILABLE, UNKNOWN_MODEL,
    Disconnect, Dispatch, Done, Error, Generate, Heartbeat, Message, Prefixes, Ready,
)
from broker.queue import PriorityQueue
from broker.records import Dest, ModelRecord, Out, RequestRecord, SilentWorker, SupervisorView, WorkerRecord
from broker.requests import OpenRequests, cancelled_unstarted, rewrite
from broker.recent import RecentReplies
from broker.routing import Route, Router, RoutingSettings

SILENT_MEMORY_S = 3600.0  # how long a silent worker is remembered if it never returns
MAX_SILENT = 1024


class BrokerState:
    """Routing, queues, deadlines and worker liveness for one broker."""

    def __init__(
        self,
        clock: Clock,
        *,
        models: list[str] | tuple[str, ...] = (),
        queue_limit: int = 1024,
        heartbeat_interval_s: float = 1.0,
        heartbeat_liveness: int = 3,
        default_timeout_s: float = 600.0,
        no_worker_timeout_s: float = 60.0,
        max_requeues: int = 1,
        aging_s: float = 2.0,
        max_affinity_keys: int = 65_536,
        hung_step_s: float = 60.0,
        key_prefix: str = "b",
        routing: RoutingSettings | None = None,
    ) -> None:
        self.clock = clock
        self.queue_limit = queue_limit
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness_s = heartbeat_interval_s * heartbeat_liveness
        self.hung_step_s = hung_step_s
        self.default_timeout_s = default_timeout_s
        self.no_worker_timeout_s = no_worker_timeout_s
        self.max_requeues = max_requeues
        self.aging_s = aging_s
        self.models: dict[str, ModelRecord] = {}
        self.workers: dict[bytes, WorkerRecord] = {}
        # abandoned: requests whose client went away before their reply.
        self.counters: dict[str, int] = {"accepted": 0, "requeued": 0, "workers_lost": 0, "dropped": 0,
                                         "abandoned": 0}
        self.open = OpenRequests(clock, self.models, self.counters)
        self.requests = self.open.requests
        self.by_client = self.open.by_client
        self.replies = self.open.replies  # terminal replies to clients, for metrics
        self.clients_gone = self.open.gone  # clients found gone with requests open, since the actor last read
        self.router = Router(clock, routing, max_affinity_keys=max_affinity_keys)
        self.affinity = self.router.affinity
        self.recent = RecentReplies(clock)  # the last minute of replies per worker, for `status` and `top`
        # Workers declared dead for silence, by worker_id, until they register again.
        self.silent: dict[str, SilentWorker] = {}
        self.losses: deque[dict[str, Any]] = deque(maxlen=32)
        # Identities asked to send `ready`, so a burst of their messages gets one request.
        self.reregister_asked_s: dict[bytes, float] = {}
        self.supervisor: SupervisorView | None = None  # the supervisor's latest state, once one came
        self.accepting = True
        self.departures: list[tuple[str, str]] = []  # (worker_id, reason) of workers lost since last read
        self.key_prefix = key_prefix
        self._keys = itertools.count(1)
        for name in models:
            self.ensure_model(name).configured = True

    # ---- models and requests ------------------------------------------------------

    def ensure_model(self, name: str) -> ModelRecord:
        """The routing record of model ``name``, created (not configured, accepting) when missing."""
        rec = self.models.get(name)
        if rec is None:
            rec = self.models[name] = ModelRecord(name, PriorityQueue(aging_s=self.aging_s))
            rec.no_worker_since_s = self.clock.now()
        return rec

    def forget_model(self, name: str) -> None:
        """Drop the routing record of ``name`` (the caller checked nothing of it is left)."""
        self.models.pop(name, None)

    def live_workers(self, model: str) -> list[WorkerRecord]:
        """Workers registered for ``model``."""
        return [w for w in self.workers.values() if w.model == model]

    def unknown_model(self, name: str, request_id: str | None) -> Error:
        """The ``unknown_model`` error for a model this broker does not serve, naming those it does."""
        served = ", ".join(sorted(n for n, m in self.models.items() if m.accepting)) or "none"
        return Error(UNKNOWN_MODEL, f"unknown model {name!r} (served: {served})", request_id)

    def finish(self, rec: RequestRecord, body: Message | dict[str, Any]) -> list[Out]:
        """Send a request's one terminal reply (once) and forget it if no worker holds it."""
        return self.open.finish(rec, body)

    def count_refusal(self, model: Any, err: Error) -> None:
        """Count an error reply to a request never accepted: labelled with its model if served here, else ""."""
        self.replies.count(model if isinstance(model, str) and model in self.models else "", err.to_map())

    def _refuse(self, client: bytes, msg: Generate, err: Error) -> list[Out]:
        self.count_refusal(msg.model, err)
        return [Out(Dest.CLIENT, client, err)]

    # ---- client side ------------------------------------------------------------

    def handle_generate(self, client: bytes, msg: Generate) -> list[Out]:
        """Accept, queue or refuse a generate request."""
        now = self.clock.now()
        if not self.accepting:
            return self._refuse(client, msg, Error(UNAVAILABLE, "the fleet is shutting down", msg.request_id))
        model = self.models.get(msg.model)
        if model is None or not model.accepting or (not model.configured and not self.live_workers(msg.model)):
            return self._refuse(client, msg, self.unknown_model(msg.model, msg.request_id))
        if (client, msg.request_id) in self.by_client:
            text = f"request_id {msg.request_id!r} is already in flight; this second request was refused, the first goes on"
            return self._refuse(client, msg, Error(DUPLICATE_REQUEST, text, msg.request_id))
        if model.queue.sequences + msg.n > self.queue_limit:
            return self._refuse(client, msg, Error(OVERLOADED, f"model {msg.model!r} queue is full (queue_limit={self.queue_limit})", msg.request_id))
        key = f"{self.key_prefix}{next(self._keys)}"
        timeout_s = msg.timeout_s if msg.timeout_s is not None else self.default_timeout_s
        rec = self.open.add(key, client, msg, now, now + timeout_s)
        model.queue.push(key, rec, msg.priority, now, client, weight=msg.n)
        self.counters["accepted"] += 1
        return self.dispatch()

    def handle_cancel(self, client: bytes, request_id: str) -> list[Out]:
        """Cancel a client's request: answer at once if queued, else ask its worker."""
        rec = self.open.lookup(client, request_id)
        if rec is None or rec.answered:
            return []
        if rec.worker is None:
            return self.finish(rec, cancelled_unstarted(rec.key, self._waited_s(rec)))
        return self.open.cancel_at_worker(rec)

    def client_gone(self, client: bytes, reason: str = "disconnected") -> list[Out]:
        """A client can no longer be reached: end what it has open, with no reply (see OpenRequests)."""
        return self.open.client_gone(client, reason)

    # ---- worker side -------------------------------------------------------------

    def handle_ready(self, identity: bytes, msg: Ready, *, held: Sequence[RequestRecord] = ()) -> list[Out]:
        """Register (or re-register) a worker.

        ``held`` are the requests it says it holds (its in-flight table, as
        :mod:`broker.adoption` rebuilt them): they run on it from now on; whatever else
        it held before is handled as by a lost worker.
        """
        out: list[Out] = []
        old = self.workers.get(identity)
        if old is not None:
            old.running -= {rec.key for rec in held}
            out += self.worker_gone(identity, "worker re-registered")
        now = self.clock.now()
        self.silent.pop(msg.worker_id, None)
        self.reregister_asked_s.pop(identity, None)
        self.router.forget_worker(identity)  # a fresh registration: its prompt cache's full report follows
        self.workers[identity] = WorkerRecord(
            identity, msg.worker_id, msg.model, max(0, msg.capacity), msg.pid, msg.host, msg.info,
            expiry_s=now + self.liveness_s, last_used_s=now,
        )
        for rec in held:
            self._place(rec, identity)
        self.ensure_model(msg.model).no_worker_since_s = None
        return out + self.dispatch()

    def _place(self, rec: RequestRecord, identity: bytes) -> None:
        """``rec`` runs on worker ``identity`` (known to this broker, or adopted)."""
        rec.worker = identity
        self.open.place(rec)
        worker = self.workers[identity]
        worker.take_slots(rec.key, rec.request.n)
        worker.max_in_flight = max(worker.max_in_flight, len(worker.running))

    def handle_worker_message(self, identity: bytes, msg: Message, raw: dict[str, Any]) -> list[Out]:
        """Heartbeats, chunks, done, error and disconnect from a worker."""
        worker = self.workers.get(identity)
        if worker is None:
            return self._ask_to_register(identity, msg)
        worker.expiry_s = self.clock.now() + self.liveness_s
        if isinstance(msg, Prefixes):
            self.router.prefixes.apply(identity, msg)
            return []
        if isinstance(msg, Heartbeat):
            worker.reported_in_flight = msg.in_flight
            worker.step_elapsed_s = msg.step_elapsed_s
            if msg.stats is not None:
                worker.stats = msg.stats
            if worker.running and msg.step_elapsed_s >= self.hung_step_s:
                # Its I/O thread answers, but its engine loop has not moved: handled as a lost worker.
                why = f"no engine progress for {msg.step_elapsed_s:.1f}s (hung_step_s={self.hung_step_s:g})"
                return self.worker_gone(identity, why, silent=True)
            return []
        if isinstance(msg, Disconnect):
            return self.worker_gone(identity, msg.reason or "worker disconnected")
        key = raw.get("request_id")
        if not isinstance(key, str):
            return []
        rec = self.requests.get(key)
        if rec is None or rec.worker != identity:
            return []  # late message for a request already ended
        if isinstance(msg, (Done, Error)):
            worker.running.discard(key)
            worker.weights.pop(key, None)
            worker.served += 1
            self.recent.add(worker.worker_id, raw)
            rec.worker = None
            out = self.finish(rec, raw)
            self.requests.pop(key, None)
            return out + self.dispatch()
        # A chunk: forward unless the client already has its answer.
        rec.streamed = True
        if rec.answered:
            return []
        return [Out(Dest.CLIENT, rec.client, rewrite(raw, rec.request.request_id))]

    def _ask_to_register(self, identity: bytes, msg: Message) -> list[Out]:
        """An unknown worker (we restarted, or declared it dead): ask for `ready`, once per interval."""
        now = self.clock.now()
        asked = self.reregister_asked_s.get(identity)
        if isinstance(msg, Disconnect) or (asked is not None and now - asked < self.heartbeat_interval_s):
            return []
        self.reregister_asked_s[identity] = now
        return [Out(Dest.WORKER, identity, Disconnect(reason="unknown worker, send ready"))]

    def worker_gone(self, identity: bytes, reason: str, *, silent: bool = False) -> list[Out]:
        """Forget a worker; requeue its unstarted requests once, fail the rest.

        ``silent`` marks a worker declared dead for missing heartbeats or for no engine
        progress: its process may still run (hung), so it is remembered until it registers
        again, and the supervisor kills it after ``hung_grace_s``.
        """
        worker = self.workers.pop(identity, None)
        if worker is None:
            return []
        now = self.clock.now()
        self.counters["workers_lost"] += 1
        self.losses.append({"worker_id": worker.worker_id, "pid": worker.pid, "reason": reason, "at_s": now,
                            "in_flight": len(worker.running)})
        self.departures.append((worker.worker_id, reason))  # the actor logs these
        if silent:
            self.silent[worker.worker_id] = SilentWorker(worker.worker_id, worker.pid, worker.host, now)
        self.router.forget_worker(identity)
        model = self.ensure_model(worker.model)
        if not self.live_workers(worker.model):
            model.no_worker_since_s = self.clock.now()
        out = self.open.worker_lost(worker, reason, model, requeue=self.accepting, max_requeues=self.max_requeues)
        return out + self.dispatch()

    # ---- routing ---------------------------------------------------------------

    def pick_worker(self, rec: RequestRecord) -> Route | None:
        """Where ``rec`` goes now (broker/routing.py: affinity, then the cached prefix, then the least loaded)."""
        return self.router.pick(rec, self.workers)

    def _has_free(self, model: str) -> bool:
        return any(w.model == model and w.free > 0 for w in self.workers.values())

    def dispatch(self) -> list[Out]:
        """Move queued requests to workers with free slots, in queue order (priority, aging, client turns).

        A request whose deadline has passed is not dispatched: it gets its
        ``timeout`` here, at once.
        """
        out: list[Out] = []
        now = self.clock.now()
        for model in self.models.values():
            if not model.queue or not self._has_free(model.name):
                continue
            for key, rec in model.queue.ordered():
                if rec.deadline_s <= now:
                    out += self.open.time_out(rec)
                    continue
                route = self.pick_worker(rec)
                if route is None or route.worker.free < min(rec.request.n, route.worker.capacity):
                    if not self._has_free(model.name):
                        break
                    continue  # affinity target busy, or too few slots for its n; others may still go
                worker = route.worker
                self.router.routed(rec, route)
                model.queue.take(key)
                worker.take_slots(key, rec.request.n)
                worker.max_in_flight = max(worker.max_in_flight, len(worker.running))
                worker.last_used_s = now
                rec.worker = worker.identity
                rec.dispatched_at_s = now
                left_s = None if rec.request.timeout_s is None else max(0.001, rec.deadline_s - now)
                request = dataclasses.replace(rec.request, request_id=key, timeout_s=left_s)
                out.append(Out(Dest.WORKER, worker.identity, Dispatch(
                    request=request, queue_s=now - rec.enqueued_at_s, client=rec.client.hex(),
                    client_request_id=rec.request.request_id)))
        return out

    # ---- time ---------------------------------------------------------------------

    def next_deadline_s(self) -> float:
        """When the earliest open request's deadline falls (math.inf if none): the actor wakes then."""
        return self.open.next_deadline_s()

    def expire(self) -> list[Out]:
        """End every open request whose deadline has passed with ``timeout``."""
        return self.open.expire()

    def tick(self) -> list[Out]:
        """Expire deadlines, declare silent workers dead, fail models with no worker."""
        now = self.clock.now()
        out: list[Out] = []
        for identity in [i for i, w in self.workers.items() if w.expiry_s <= now]:
            out += self.worker_gone(identity, f"no heartbeat for {self.liveness_s:.1f}s", silent=True)
        self._forget_old(now)
        out += self.expire()
        for model in self.models.values():
            since = model.no_worker_since_s
            if since is not None and len(model.queue) and now - since >= self.no_worker_timeout_s:
                for key, rec in list(model.queue.ordered()):
                    out += self.finish(rec, Error(UNAVAILABLE, f"model {model.name!r} has had no live worker for {now - since:.0f}s", key))
        return out

    def _forget_old(self, now: float) -> None:
        """Bound the bookkeeping kept about departed peers."""
        for identity, at_s in list(self.reregister_asked_s.items()):
            if now - at_s >= self.liveness_s:
                del self.reregister_asked_s[identity]
        for wid, rec in list(self.silent.items()):
            if now - rec.since_s >= SILENT_MEMORY_S or len(self.silent) > MAX_SILENT:
                del self.silent[wid]

    # ---- the supervisor -------------------------------------------------------------

    def handle_supervisor_state(self, msg: SupervisorState) -> list[Out]:
        """Keep the supervisor's view; forget workers whose process it saw exit; ack (registered and silent)."""
        self.supervisor = view = SupervisorView.of(msg, self.clock.now())
        out: list[Out] = []
        children = view.workers()
        for w in list(self.workers.values()):
            child = children.get(w.worker_id)
            if child is not None and w.pid in child["exited_pids"]:
                code = child.get("last_exit")
                out += self.worker_gone(w.identity, f"its process {w.pid} exited (code {code})")
        registered = sorted(w.worker_id for w in self.workers.values() if not w.retiring)
        return out + [Out(Dest.CONTROL, b"", SupervisorStateAck(registered, self.silent_workers()))]

    def silent_workers(self) -> list[dict[str, Any]]:
        """Workers declared dead for silence and not registered since (their process may be hung)."""
        now = self.clock.now()
        return [{"worker_id": s.worker_id, "pid": s.pid, "silent_for_s": round(now - s.since_s, 3)}
                for s in self.silent.values()]

    def heartbeats(self) -> list[Out]:
        """One heartbeat to every worker (the actor calls this every interval)."""
        return [Out(Dest.WORKER, w.identity, Heartbeat(worker_id="broker")) for w in self.workers.values()]

    def stop_accepting(self) -> None:
        """Draining: refuse new requests; queued and running ones still complete."""
        self.accepting = False

    def fail_all(self, code: str, message: str) -> list[Out]:
        """Give every open request its terminal error, and cancel it on its worker (broker exit)."""
        out: list[Out] = []
        for rec in list(self.requests.values()):
            if not rec.answered:
                out += self.open.cancel_at_worker(rec, CANCEL_BROKER_EXIT)
            out += self.finish(rec, Error(code, message, rec.key))
        return out

    def _waited_s(self, rec: RequestRecord) -> float:
        return self.clock.now() - rec.enqueued_at_s
