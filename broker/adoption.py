"""How a broker takes over the requests of the broker before it: pure, a clock, over :class:`BrokerState`.

A broker that crashed or was restarted knew which client each running request
belonged to; the new one does not. The workers and the clients still know:

- A worker that lost its broker goes on decoding, and when it registers again its
  ``ready`` carries its in-flight table (docs/protocol.md, Broker recovery). Each row
  becomes a :class:`broker.records.RequestRecord` on that worker, under the key the old
  broker gave it, so the output the worker sends next reaches the client under its own
  ``request_id``. Keys never collide: each broker process has its own key prefix.
- A client resends (``resend: true``) each request that had shown it no output. One that
  a worker's table holds is not run again: its replies answer the resend. Because a
  client may reconnect before the worker that holds its request does, a resend that no
  table holds yet waits for ``window_s`` after the broker starts (or until every worker
  the supervisor runs has registered again, if that is sooner); then it runs. A table
  that comes later still, for a request that runs anew meanwhile, is cancelled on its
  worker: the client sees one run.

Rows that cannot be adopted (their request already ended here, or the client's request
id now names a request that runs anew) are cancelled on their worker.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from actors.clock import Clock
from actors.limits import DEFAULT_LIMITS
from actors.protocol import CANCEL_NOT_ADOPTED, PRIORITIES, Cancel, Generate, Ready
from broker.records import Dest, Out, RequestRecord
from broker.requests import cancelled_unstarted
from broker.state import BrokerState

MEMORY_S = 60.0  # how long adopted requests and early cancels are remembered
MAX_MEMORY = 65_536  # entries kept in each memory
MAX_ROWS = 4096  # rows of one table; the rest are dropped (and counted)
MAX_HELD = 65_536  # resends waiting for a table

Pair = tuple[bytes, str]  # (client routing id, the client's request_id)


@dataclass(frozen=True)
class Row:
    """One checked row of a worker's in-flight table."""

    key: str
    client: bytes
    request_id: str
    stream: bool
    started: bool
    finished: bool
    priority: str
    affinity: str | None
    timeout_s: float | None


def parse_row(raw: Any) -> Row | None:
    """A table row, or None when it is malformed (the sender is a worker: trusted, not infallible)."""
    if not isinstance(raw, dict):
        return None
    key, client, rid = raw.get("request_id"), raw.get("client"), raw.get("client_request_id")
    max_id = DEFAULT_LIMITS.max_id_chars
    if not (isinstance(key, str) and 0 < len(key) <= max_id and isinstance(rid, str) and 0 < len(rid) <= max_id):
        return None
    try:
        identity = bytes.fromhex(client) if isinstance(client, str) else b""
    except ValueError:
        return None
    stream, started, finished = (raw.get(name, False) for name in ("stream", "started", "finished"))
    timeout_s, affinity, priority = raw.get("timeout_s"), raw.get("affinity"), raw.get("priority", "default")
    if not 0 < len(identity) <= 255 or not all(isinstance(f, bool) for f in (stream, started, finished)):
        return None
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not 0 < timeout_s <= 86_400):
        return None
    if (affinity is not None and not (isinstance(affinity, str) and len(affinity) <= max_id)) or priority not in PRIORITIES:
        return None
    return Row(key, identity, rid, stream, started, finished, priority, affinity,
               None if timeout_s is None else float(timeout_s))


@dataclass
class Held:
    """A resent request waiting for the adoption window to end."""

    client: bytes
    msg: Generate
    at_s: float


class Adoption:
    """Workers' tables and clients' resends, after this broker started."""

    def __init__(self, state: BrokerState, clock: Clock, *, window_s: float = 3.0) -> None:
        self.state = state
        self.clock = clock
        self.window_s = window_s
        self.started_s = clock.now()
        self.held: OrderedDict[Pair, Held] = OrderedDict()
        self.adopted: OrderedDict[Pair, float] = OrderedDict()  # adopted requests, when
        self.adopted_keys: OrderedDict[str, float] = OrderedDict()
        self.early_cancels: OrderedDict[Pair, float] = OrderedDict()  # for requests no table had shown yet
        self.counters = {"adopted": 0, "resends_joined": 0, "resends_held": 0, "resends_run": 0,
                         "rows_refused": 0}

    @property
    def in_window(self) -> bool:
        """True while resends that no table holds still wait."""
        return self.clock.now() - self.started_s < self.window_s and not self._all_back()

    def _all_back(self) -> bool:
        """True when every worker process the supervisor runs has registered: no table is still to come."""
        view = self.state.supervisor
        if view is None:
            return False
        alive = {wid for wid, child in view.workers().items() if child.get("alive")}
        registered = {w.worker_id for w in self.state.workers.values()}
        return bool(alive) and alive <= registered and registered <= set(view.workers())

    # ---- workers ----------------------------------------------------------------------

    def handle_ready(self, identity: bytes, msg: Ready) -> list[Out]:
        """Register a worker with what its table says it holds; cancel on it the rows that cannot be adopted."""
        held: list[RequestRecord] = []
        taken: set[str] = set()  # the keys in ``held``
        claimed: set[Pair] = set()  # the client ids they answer to
        refused: list[Out] = []
        rows = [r for r in map(parse_row, (msg.requests or [])[:MAX_ROWS]) if r is not None]
        self.counters["rows_refused"] += len(msg.requests or []) - len(rows)
        for row in sorted(rows, key=lambda r: r.finished):  # a live row claims its client's id first
            rec = self._rebuild(identity, row, msg.model, taken, claimed)
            if rec is not None:
                held.append(rec)
                taken.add(rec.key)
                claimed.add((rec.client, rec.request.request_id))
            elif not row.finished:
                self.counters["rows_refused"] += 1
                refused.append(Out(Dest.WORKER, identity, Cancel(request_id=row.key, reason=CANCEL_NOT_ADOPTED)))
        out = self.state.handle_ready(identity, msg, held=held)
        for rec in held:
            out += self._settle(rec)
        return refused + out

    def _rebuild(self, identity: bytes, row: Row, model: str, taken: set[str],
                 claimed: set[Pair]) -> RequestRecord | None:
        """The record of one row: the one this broker knows, a new adopted one, or None (refused).

        ``taken`` and ``claimed`` are the keys and client ids of the rows already taken from this table.
        """
        known = self.state.requests.get(row.key)
        if known is not None:  # ours already
            if known.key in taken or known.answered:
                return None
            if known.worker is None:  # queued again when this worker went quiet: it never stopped running it
                return known if self.state.ensure_model(model).queue.remove(known.key) is not None else None
            return known if known.worker == identity else None  # else it runs again elsewhere
        if row.key.startswith(self.state.key_prefix) or row.key in self.adopted_keys:
            return None  # it ended here already
        pair = (row.client, row.request_id)
        if pair in self.state.by_client or pair in claimed:
            return None  # the client's id names another request now
        now = self.clock.now()
        request = Generate(request_id=row.request_id, model=model, stream=row.stream, priority=row.priority,
                           affinity=row.affinity, timeout_s=row.timeout_s)
        deadline_s = now + (row.timeout_s if row.timeout_s is not None else self.state.default_timeout_s)
        self._remember(self.adopted_keys, row.key)
        self._remember(self.adopted, pair)
        self.counters["adopted"] += 1
        return RequestRecord(row.key, row.client, request, now, deadline_s, dispatched_at_s=now,
                             streamed=row.started, adopted=True)

    def _settle(self, rec: RequestRecord) -> list[Out]:
        """A request now on its worker: the resend waiting for it is answered by it; an early cancel applies."""
        pair = (rec.client, rec.request.request_id)
        if self.held.pop(pair, None) is not None:
            self.counters["resends_joined"] += 1
        if self.early_cancels.pop(pair, None) is not None:
            return self.state.handle_cancel(*pair)
        return []

    # ---- clients ----------------------------------------------------------------------

    def handle_generate(self, client: bytes, msg: Generate) -> list[Out]:
        """A generate; a resend is joined to the request that runs it, held in the window, or run."""
        if not msg.resend:
            return self.state.handle_generate(client, msg)
        pair = (client, msg.request_id)
        if pair in self.state.by_client or pair in self.adopted:
            self.counters["resends_joined"] += 1
            return []  # it runs (or ran) already: its own replies answer the client
        if self.in_window and len(self.held) < MAX_HELD:
            self.counters["resends_held"] += 1
            self.held[pair] = Held(client, msg, self.clock.now())
            return []
        self.counters["resends_run"] += 1
        return self.state.handle_generate(client, msg)

    def handle_cancel(self, client: bytes, request_id: str) -> list[Out]:
        """A cancel; one for a request no table has shown yet is kept, in case one does."""
        pair = (client, request_id)
        held = self.held.pop(pair, None)
        if held is not None:
            return [Out(Dest.CLIENT, client, cancelled_unstarted(request_id, self.clock.now() - held.at_s))]
        if pair not in self.state.by_client:
            self._remember(self.early_cancels, pair)
        return self.state.handle_cancel(client, request_id)

    def awaits(self, client: bytes) -> bool:
        """True when requests of ``client`` were adopted lately: it may not have reconnected yet."""
        return any(cid == client for cid, _ in self.adopted)

    # ---- time ---------------------------------------------------------------------------

    def tick(self) -> list[Out]:
        """Once the window is over, run the resends no table held; forget old memories."""
        out: list[Out] = []
        if self.held and not self.in_window:
            held, self.held = list(self.held.values()), OrderedDict()
            self.counters["resends_run"] += len(held)
            for h in held:
                out += self.state.handle_generate(h.client, h.msg)
        now = self.clock.now()
        for memory in (self.adopted, self.adopted_keys, self.early_cancels):
            while memory and now - next(iter(memory.values())) >= MEMORY_S:
                memory.popitem(last=False)
        return out

    def view(self) -> dict[str, Any]:
        """For `status`: the window and the counts."""
        return {"adoption_window_s": self.window_s, "in_window": self.in_window, "held_resends": len(self.held),
                **self.counters}

    def _remember(self, memory: OrderedDict[Any, float], item: Any) -> None:
        memory[item] = self.clock.now()
        memory.move_to_end(item)
        while len(memory) > MAX_MEMORY:
            memory.popitem(last=False)
