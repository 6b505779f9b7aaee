"""The broker's routing, queueing and liveness state: pure, no sockets, a clock.

Every handler returns a list of :class:`Out` (who to send what); the broker
actor only moves bytes. Requests get broker-side keys (``b<N>``) so that two
clients may use the same request_id; replies are rewritten back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from actors.clock import Clock
from actors.protocol import (
    CANCELLED, OVERLOADED, TIMEOUT, UNAVAILABLE, UNKNOWN_MODEL, WORKER_LOST,
    Cancel, Disconnect, Dispatch, Done, Error, Generate, Heartbeat, Message, Ready,
)
from broker.queue import PriorityQueue

CLIENT = "client"
WORKER = "worker"


@dataclass
class Out:
    """One message to send: to a client or a worker identity. ``body`` is a Message or a map."""

    to: str
    identity: bytes
    body: Message | dict[str, Any]


@dataclass
class WorkerRecord:
    """A live worker as the broker sees it."""

    identity: bytes
    worker_id: str
    model: str
    capacity: int
    pid: int
    host: str
    info: dict
    expiry_s: float
    last_used_s: float = 0.0
    running: set[str] = field(default_factory=set)
    reported_in_flight: int = 0
    served: int = 0
    stats: dict = field(default_factory=dict)
    retiring: bool = False  # being stopped (unload, idle): finishes what it runs, gets nothing new
    max_in_flight: int = 0  # the most requests it ever held at once

    @property
    def free(self) -> int:
        """Slots the broker may still fill (none while retiring)."""
        return 0 if self.retiring else self.capacity - len(self.running)


@dataclass
class RequestRecord:
    """An accepted request until its one terminal reply."""

    key: str
    client: bytes
    request: Generate
    enqueued_at_s: float
    deadline_s: float
    worker: bytes | None = None
    dispatched_at_s: float = 0.0
    streamed: bool = False
    requeues: int = 0
    answered: bool = False  # the client already has its terminal reply
    cancel_sent: bool = False


@dataclass
class ModelRecord:
    """Per-model queue and counters."""

    name: str
    queue: PriorityQueue[RequestRecord]
    configured: bool = False
    no_worker_since_s: float | None = None
    accepting: bool = True  # False while unloading: new requests get unknown_model


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
    ) -> None:
        self.clock = clock
        self.queue_limit = queue_limit
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness_s = heartbeat_interval_s * heartbeat_liveness
        self.default_timeout_s = default_timeout_s
        self.no_worker_timeout_s = no_worker_timeout_s
        self.max_requeues = max_requeues
        self.aging_s = aging_s
        self.models: dict[str, ModelRecord] = {}
        self.workers: dict[bytes, WorkerRecord] = {}
        self.requests: dict[str, RequestRecord] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}
        self.affinity: dict[tuple[str, str], bytes] = {}
        self.accepting = True
        self.departures: list[tuple[str, str]] = []  # (worker_id, reason) of workers lost since last read
        self.counters: dict[str, int] = {"accepted": 0, "requeued": 0, "workers_lost": 0, "dropped": 0}
        self._keys = itertools.count(1)
        for name in models:
            self._model(name).configured = True

    # ---- helpers -------------------------------------------------------------

    def _model(self, name: str) -> ModelRecord:
        rec = self.models.get(name)
        if rec is None:
            rec = self.models[name] = ModelRecord(name, PriorityQueue(aging_s=self.aging_s))
            rec.no_worker_since_s = self.clock.now()
        return rec

    def live_workers(self, model: str) -> list[WorkerRecord]:
        """Workers registered for ``model``."""
        return [w for w in self.workers.values() if w.model == model]

    def _finish(self, rec: RequestRecord, body: Message) -> list[Out]:
        """Send the one terminal reply (once) and forget the request if no worker holds it."""
        out: list[Out] = []
        if not rec.answered:
            rec.answered = True
            out.append(Out(CLIENT, rec.client, _for_client(body, rec)))
        self.by_client.pop((rec.client, rec.request.request_id), None)
        if rec.worker is None:
            self.requests.pop(rec.key, None)
            self._model(rec.request.model).queue.remove(rec.key)
        return out

    # ---- client side ------------------------------------------------------------

    def handle_generate(self, client: bytes, msg: Generate) -> list[Out]:
        """Accept, queue or refuse a generate request."""
        now = self.clock.now()
        if not self.accepting:
            return [Out(CLIENT, client, Error(UNAVAILABLE, "the fleet is shutting down", msg.request_id))]
        model = self.models.get(msg.model)
        if model is None or not model.accepting or (not model.configured and not self.live_workers(msg.model)):
            known = ", ".join(sorted(n for n, m in self.models.items() if m.accepting)) or "none"
            return [Out(CLIENT, client, Error(UNKNOWN_MODEL, f"unknown model {msg.model!r} (served: {known})", msg.request_id))]
        if (client, msg.request_id) in self.by_client:
            return [Out(CLIENT, client, Error("bad_request", f"request_id {msg.request_id!r} is already in flight", msg.request_id))]
        if len(model.queue) >= self.queue_limit:
            return [Out(CLIENT, client, Error(OVERLOADED, f"model {msg.model!r} queue is full (queue_limit={self.queue_limit})", msg.request_id))]
        key = f"b{next(self._keys)}"
        timeout_s = msg.timeout_s if msg.timeout_s is not None else self.default_timeout_s
        rec = RequestRecord(key, client, msg, now, now + timeout_s)
        self.requests[key] = rec
        self.by_client[(client, msg.request_id)] = key
        model.queue.push(key, rec, msg.priority, now)
        self.counters["accepted"] += 1
        return self.dispatch()

    def handle_cancel(self, client: bytes, request_id: str) -> list[Out]:
        """Cancel a client's request: answer at once if queued, else ask its worker."""
        key = self.by_client.get((client, request_id))
        rec = self.requests.get(key) if key else None
        if rec is None or rec.answered:
            return []
        if rec.worker is None:
            return self._finish(rec, Done(request_id=key, finish_reason="cancelled", usage=_zero_usage(), timings=self._queued_timings(rec)))
        if not rec.cancel_sent:
            rec.cancel_sent = True
            return [Out(WORKER, rec.worker, Cancel(request_id=key))]
        return []

    def client_gone(self, client: bytes) -> list[Out]:
        """A client can no longer be reached: cancel everything it has in flight."""
        out: list[Out] = []
        for (cid, rid) in [k for k in self.by_client if k[0] == client]:
            key = self.by_client[(cid, rid)]
            rec = self.requests[key]
            out += self.handle_cancel(client, rid)
            rec.answered = True  # nothing more can reach it
            self.by_client.pop((cid, rid), None)
        return out

    # ---- worker side -------------------------------------------------------------

    def handle_ready(self, identity: bytes, msg: Ready) -> list[Out]:
        """Register (or re-register) a worker."""
        out: list[Out] = []
        if identity in self.workers:
            out += self._lose_worker(identity, "worker re-registered")
        now = self.clock.now()
        self.workers[identity] = WorkerRecord(
            identity, msg.worker_id, msg.model, max(0, msg.capacity), msg.pid, msg.host, msg.info,
            expiry_s=now + self.liveness_s, last_used_s=now,
        )
        self._model(msg.model).no_worker_since_s = None
        return out + self.dispatch()

    def handle_worker_message(self, identity: bytes, msg: Message, raw: dict[str, Any]) -> list[Out]:
        """Heartbeats, chunks, done, error and disconnect from a worker."""
        worker = self.workers.get(identity)
        if worker is None:
            # Unknown (e.g. we restarted): ask it to register again.
            return [] if isinstance(msg, Disconnect) else [Out(WORKER, identity, Disconnect(reason="unknown worker, send ready"))]
        worker.expiry_s = self.clock.now() + self.liveness_s
        if isinstance(msg, Heartbeat):
            worker.reported_in_flight = msg.in_flight
            if msg.stats is not None:
                worker.stats = msg.stats
            return []
        if isinstance(msg, Disconnect):
            return self._lose_worker(identity, msg.reason or "worker disconnected")
        key = raw.get("request_id")
        rec = self.requests.get(key) if isinstance(key, str) else None
        if rec is None or rec.worker != identity:
            return []  # late message for a request already ended
        if isinstance(msg, (Done, Error)):
            worker.running.discard(key)
            worker.served += 1
            rec.worker = None
            out = self._finish(rec, raw)
            self.requests.pop(key, None)
            return out + self.dispatch()
        # A chunk: forward unless the client already has its answer.
        rec.streamed = True
        if rec.answered:
            return []
        return [Out(CLIENT, rec.client, _rewrite(raw, rec.request.request_id))]

    def _lose_worker(self, identity: bytes, reason: str) -> list[Out]:
        """Forget a worker; requeue its unstarted requests once, fail the rest."""
        worker = self.workers.pop(identity, None)
        if worker is None:
            return []
        self.counters["workers_lost"] += 1
        self.departures.append((worker.worker_id, reason))  # the actor logs these
        for k, v in list(self.affinity.items()):
            if v == identity:
                del self.affinity[k]
        model = self._model(worker.model)
        if not self.live_workers(worker.model):
            model.no_worker_since_s = self.clock.now()
        out: list[Out] = []
        for key in sorted(worker.running):
            rec = self.requests.get(key)
            if rec is None:
                continue
            rec.worker = None
            if rec.answered:
                self.requests.pop(key, None)
            elif rec.cancel_sent:
                # The client asked to stop it: end it as cancelled rather than start it again.
                done = Done(request_id=key, finish_reason="cancelled", usage=_zero_usage(), timings=self._queued_timings(rec))
                out += self._finish(rec, done)
            elif not rec.streamed and rec.requeues < self.max_requeues and self.accepting:
                rec.requeues += 1
                self.counters["requeued"] += 1
                model.queue.push(key, rec, rec.request.priority, rec.enqueued_at_s)
            else:
                msg = f"worker {worker.worker_id} was lost ({reason}) after output had started"
                out += self._finish(rec, Error(WORKER_LOST, msg, key))
        return out + self.dispatch()

    # ---- routing ---------------------------------------------------------------

    def pick_worker(self, rec: RequestRecord) -> WorkerRecord | None:
        """Affinity first; else the live replica with most free slots, least recently used on ties."""
        req = rec.request
        if req.affinity is not None:
            bound = self.workers.get(self.affinity.get((req.model, req.affinity), b""))
            if bound is not None:
                return bound if bound.free > 0 else None
        best: WorkerRecord | None = None
        for w in self.workers.values():
            if w.model != req.model or w.free <= 0:
                continue
            if best is None or (w.free, -w.last_used_s) > (best.free, -best.last_used_s):
                best = w
        return best

    def dispatch(self) -> list[Out]:
        """Move queued requests to workers with free slots, in priority order."""
        out: list[Out] = []
        now = self.clock.now()
        for model in self.models.values():
            if not model.queue or not any(w.model == model.name and w.free > 0 for w in self.workers.values()):
                continue
            for key, rec in list(model.queue.ordered()):
                worker = self.pick_worker(rec)
                if worker is None:
                    if not any(w.model == model.name and w.free > 0 for w in self.workers.values()):
                        break
                    continue  # affinity target busy; others may still go
                model.queue.remove(key)
                worker.running.add(key)
                worker.max_in_flight = max(worker.max_in_flight, len(worker.running))
                worker.last_used_s = now
                rec.worker = worker.identity
                rec.dispatched_at_s = now
                if rec.request.affinity is not None:
                    self.affinity[(rec.request.model, rec.request.affinity)] = worker.identity
                body = rec.request.to_map()
                body["request_id"] = key
                if rec.request.timeout_s is not None:
                    body["timeout_s"] = max(0.001, rec.deadline_s - now)
                out.append(Out(WORKER, worker.identity, Dispatch(request=body, queue_s=now - rec.enqueued_at_s)))
        return out

    # ---- time ---------------------------------------------------------------------

    def tick(self) -> list[Out]:
        """Expire deadlines, declare silent workers dead, fail models with no worker."""
        now = self.clock.now()
        out: list[Out] = []
        for identity in [i for i, w in self.workers.items() if w.expiry_s <= now]:
            out += self._lose_worker(identity, f"no heartbeat for {self.liveness_s:.1f}s")
        for rec in [r for r in self.requests.values() if r.deadline_s <= now and not r.answered]:
            msg = Error(TIMEOUT, f"request exceeded its timeout_s ({rec.deadline_s - rec.enqueued_at_s:.3f}s)", rec.key)
            if rec.worker is not None and not rec.cancel_sent:
                rec.cancel_sent = True
                out.append(Out(WORKER, rec.worker, Cancel(request_id=rec.key)))
            out += self._finish(rec, msg)
        for model in self.models.values():
            since = model.no_worker_since_s
            if since is not None and len(model.queue) and now - since >= self.no_worker_timeout_s:
                for key, rec in list(model.queue.ordered()):
                    out += self._finish(rec, Error(UNAVAILABLE, f"model {model.name!r} has had no live worker for {now - since:.0f}s", key))
        return out

    def heartbeats(self) -> list[Out]:
        """One heartbeat to every worker (the actor calls this every interval)."""
        return [Out(WORKER, w.identity, Heartbeat(worker_id="broker")) for w in self.workers.values()]

    def stop_accepting(self) -> None:
        """Draining: refuse new requests; queued and running ones still complete."""
        self.accepting = False

    def fail_all(self, code: str, message: str) -> list[Out]:
        """Give every open request its terminal error (broker exit)."""
        out: list[Out] = []
        for rec in list(self.requests.values()):
            out += self._finish(rec, Error(code, message, rec.key))
        return out

    def _queued_timings(self, rec: RequestRecord) -> dict[str, float]:
        waited = self.clock.now() - rec.enqueued_at_s
        return {"queue_s": waited, "ttft_s": 0.0, "total_s": waited}

    # ---- reporting ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A JSON-like view for `status`."""
        now = self.clock.now()
        models: dict[str, Any] = {}
        for name, m in sorted(self.models.items()):
            workers = self.live_workers(name)
            models[name] = {
                "queue_depth": len(m.queue),
                "running": sum(len(w.running) for w in workers),
                "workers": [
                    {
                        "worker_id": w.worker_id, "pid": w.pid, "host": w.host,
                        "state": "retiring" if w.retiring else "ready", "capacity": w.capacity,
                        "in_flight": len(w.running), "free": w.free, "max_in_flight": w.max_in_flight,
                        "served": w.served, "last_seen_s": round(now - (w.expiry_s - self.liveness_s), 3),
                        "info": w.info, "stats": w.stats,
                    }
                    for w in sorted(workers, key=lambda w: w.worker_id)
                ],
            }
        return {"models": models, "accepting": self.accepting, "counters": dict(self.counters), "requests": len(self.requests)}


def _zero_usage() -> dict[str, int]:
    return {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}


def _rewrite(raw: dict[str, Any], request_id: str) -> dict[str, Any]:
    out = dict(raw)
    out["request_id"] = request_id
    return out


def _for_client(body: Message | dict[str, Any], rec: RequestRecord) -> dict[str, Any]:
    """The map the client sees, with its own request_id."""
    data = body.to_map() if isinstance(body, Message) else body
    return _rewrite(data, rec.request.request_id)
