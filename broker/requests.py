"""The broker's accepted requests until their one terminal reply: by key, by client, by deadline.

Pure: no sockets, a clock. :class:`broker.state.BrokerState` owns one
:class:`OpenRequests` and shares its model records with it, so a request that
ends while queued leaves its model's queue here too.
"""

from __future__ import annotations

from typing import Any

from actors.clock import Clock
from actors.protocol import CANCEL_CLIENT_GONE, CANCEL_TIMEOUT, TIMEOUT, WORKER_LOST, Cancel, Done, Error, Generate, Message
from broker.deadlines import Deadlines
from broker.records import ClientGone, Dest, ModelRecord, Out, ReplyCounts, RequestRecord, WorkerRecord


class OpenRequests:
    """Every accepted request that still has a reply owed, or a worker still running it."""

    def __init__(self, clock: Clock, models: dict[str, ModelRecord], counters: dict[str, int]) -> None:
        self.clock = clock
        self.models = models  # shared with the state: a request ending while queued leaves its queue
        self.counters = counters
        self.requests: dict[str, RequestRecord] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}  # (client, its request_id) -> broker key
        self.of_client: dict[bytes, set[str]] = {}  # client -> its open broker keys
        self.deadlines = Deadlines()
        self.replies = ReplyCounts()  # terminal replies to clients, for metrics
        self.gone: list[ClientGone] = []  # clients found gone with requests open, for the actor to log

    def add(self, key: str, client: bytes, msg: Generate, now_s: float, deadline_s: float) -> RequestRecord:
        """Record an accepted request."""
        rec = RequestRecord(key, client, msg, now_s, deadline_s)
        self.requests[key] = rec
        self.by_client[(client, msg.request_id)] = key
        self.of_client.setdefault(client, set()).add(key)
        self.deadlines.add(key, deadline_s)
        return rec

    def place(self, rec: RequestRecord) -> None:
        """Track a request rebuilt elsewhere (adopted from a worker's table), or one kept as it was."""
        if self.requests.get(rec.key) is not rec:
            self.requests[rec.key] = rec
            self.deadlines.add(rec.key, rec.deadline_s)
        if not rec.answered:
            self.by_client[(rec.client, rec.request.request_id)] = rec.key
            self.of_client.setdefault(rec.client, set()).add(rec.key)

    def lookup(self, client: bytes, request_id: str) -> RequestRecord | None:
        """The open request ``request_id`` of ``client``."""
        key = self.by_client.get((client, request_id))
        return self.requests.get(key) if key else None

    def finish(self, rec: RequestRecord, body: Message | dict[str, Any]) -> list[Out]:
        """Send a request's one terminal reply (once) and forget it if no worker holds it."""
        out: list[Out] = []
        if not rec.answered:
            rec.answered = True
            data = body.to_map() if isinstance(body, Message) else body
            self.replies.count(rec.request.model, data)
            out.append(Out(Dest.CLIENT, rec.client, rewrite(data, rec.request.request_id)))
        self._untrack(rec)
        if rec.worker is None:
            self._drop(rec)
        return out

    def cancel_at_worker(self, rec: RequestRecord, reason: str | None = None) -> list[Out]:
        """Ask the worker running ``rec`` to stop it (once); ``reason`` when the client did not ask."""
        if rec.worker is None or rec.cancel_sent:
            return []
        rec.cancel_sent = True
        return [Out(Dest.WORKER, rec.worker, Cancel(request_id=rec.key, reason=reason))]

    def client_gone(self, client: bytes, reason: str = "disconnected") -> list[Out]:
        """A client can no longer be reached: end everything it has open, with no reply.

        Queued requests are dropped, running ones cancelled at their workers.
        When it had any, one :class:`ClientGone` is noted in ``gone`` for the
        actor to log: one line per client, however many requests.
        """
        out: list[Out] = []
        running = queued = 0
        for key in sorted(self.of_client.pop(client, ())):
            rec = self.requests.get(key)
            if rec is None or rec.answered:
                continue
            rec.answered = True  # nothing more can reach it
            self._untrack(rec)
            self.counters["abandoned"] += 1
            if rec.worker is None:
                queued += 1
                self._drop(rec)
            else:
                running += 1
                out += self.cancel_at_worker(rec, CANCEL_CLIENT_GONE)
        if running or queued:
            self.gone.append(ClientGone(client, reason, running, queued))
        return out

    def worker_lost(self, worker: WorkerRecord, reason: str, model: ModelRecord, *, requeue: bool,
                    max_requeues: int) -> list[Out]:
        """The requests ``worker`` ran when it was lost: requeue each unstarted one once (when ``requeue``), end the rest.

        A request the client had asked to stop ends as cancelled; one whose output had started,
        one adopted from a worker's table, or one requeued ``max_requeues`` times ends with
        ``worker_lost``, saying why.
        """
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
                out += self.finish(rec, cancelled_unstarted(key, self.clock.now() - rec.enqueued_at_s))
            elif not rec.streamed and not rec.adopted and rec.requeues < max_requeues and requeue:
                rec.requeues += 1
                self.counters["requeued"] += 1
                model.queue.push(key, rec, rec.request.priority, rec.enqueued_at_s, rec.client,
                                 weight=rec.request.n)
            else:
                why = ("after output had started" if rec.streamed else
                       "while draining" if not requeue else
                       "after it was adopted from its table (the prompt stayed with that worker)" if rec.adopted else
                       f"and it was already requeued {rec.requeues}x")
                out += self.finish(rec, Error(WORKER_LOST, f"worker {worker.worker_id} was lost ({reason}) {why}", key))
        return out

    # ---- deadlines ----------------------------------------------------------------------

    def next_deadline_s(self) -> float:
        """When the earliest open request's deadline falls (math.inf if none)."""
        return self.deadlines.next_s(self._deadline_live)

    def expire(self) -> list[Out]:
        """End every open request whose deadline has passed with ``timeout`` (its worker is told to stop)."""
        out: list[Out] = []
        for key in self.deadlines.due(self.clock.now(), self._deadline_live):
            out += self.time_out(self.requests[key])
        self.deadlines.compact(self._deadline_live, len(self.requests))
        return out

    def time_out(self, rec: RequestRecord) -> list[Out]:
        """End ``rec`` with ``timeout`` now; a worker running it is told why (no ``done`` will reach the client)."""
        msg = Error(TIMEOUT, f"request exceeded its timeout_s ({rec.deadline_s - rec.enqueued_at_s:.3f}s)", rec.key)
        return self.cancel_at_worker(rec, CANCEL_TIMEOUT) + self.finish(rec, msg)

    def _deadline_live(self, key: str, deadline_s: float) -> bool:
        rec = self.requests.get(key)
        return rec is not None and not rec.answered and rec.deadline_s == deadline_s

    # ---- bookkeeping --------------------------------------------------------------------

    def _untrack(self, rec: RequestRecord) -> None:
        """The client expects nothing more of ``rec``: its request_id is free again."""
        if self.by_client.get((rec.client, rec.request.request_id)) == rec.key:
            del self.by_client[(rec.client, rec.request.request_id)]
        keys = self.of_client.get(rec.client)
        if keys is not None:
            keys.discard(rec.key)
            if not keys:
                del self.of_client[rec.client]

    def _drop(self, rec: RequestRecord) -> None:
        """Forget a request no worker holds (and take it out of its model's queue)."""
        self.requests.pop(rec.key, None)
        model = self.models.get(rec.request.model)
        if model is not None:
            model.queue.remove(rec.key)


def rewrite(raw: dict[str, Any], request_id: str) -> dict[str, Any]:
    """A worker's reply map under the client's own request_id."""
    out = dict(raw)
    out["request_id"] = request_id
    return out


def cancelled_unstarted(request_id: str, waited_s: float) -> Done:
    """The ``done`` of a request cancelled before any output: no usage, all its time spent waiting."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    return Done(request_id, "cancelled", usage, {"queue_s": waited_s, "ttft_s": 0.0, "total_s": waited_s})
