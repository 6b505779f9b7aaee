"""A worker's replies to the broker, assembled where they are sent: pure, a clock.

The worker's session (:mod:`workers.session`) runs on the MLX thread and says what
happened to each request: :class:`Progress` (new text and token ids, usage so far) and
the terminal ``done`` or ``error``. The I/O thread feeds those to a :class:`ReplyLedger`,
which turns them into wire messages:

- a streamed request's output goes out as ``chunk`` messages, each saying where in the
  output it starts (``text_offset``, ``token_offset``); token ids whose text is held back
  wait for it, and any left go out in one last chunk before the ``done``;
- a non-streamed request's text and ids are gathered here and put into its ``done``;
- a ``cancel`` is answered at once, even in the middle of an engine step: ``done`` with
  ``finish_reason: "cancelled"``, the usage known so far, and the text so far when not
  streamed. Whatever the session still says about that request afterwards, its own
  ``done`` included, is dropped: every request gets exactly one terminal reply.

The ledger also keeps what a new broker needs should this one be lost (docs/protocol.md,
Broker recovery): each request's owner, its whole output so far, and for ``linger_s``
after it was sent, its terminal message. :meth:`ReplyLedger.table` is the in-flight
table a ``ready`` carries, and :meth:`ReplyLedger.replay` sends the output again from
its start. While the broker is away (``away``), the output kept may not pass
``budget_bytes``: a request whose output would pass it ends with ``worker_lost``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Union

from actors.clock import Clock
from actors.protocol import WORKER_LOST, Chunk, Dispatch, Done, Error, Generate, Message

ID_BYTES = 4  # what one kept token id counts for against the budget
LOGPROB_BYTES = 48  # what one kept logprob entry (or one of its alternatives) counts for
MAX_TABLE_ROWS = 4096  # rows a `ready` carries (a broker reads no more); answered ones beyond are forgotten first


@dataclass(slots=True)
class Progress:
    """What the session learned about one request: new output and the usage so far (not a wire message).

    The counts and times are the request's current figures, not increments;
    ``text`` and ``token_ids`` are new since the last Progress.
    """

    key: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    admitted_s: float = 0.0  # clock time of admission into the batch; 0: still waiting
    first_token_s: float = 0.0  # clock time of the first token; 0: none yet
    index: int = 0  # which of the request's completions the new output belongs to
    logprobs: list[dict[str, Any]] | None = None  # one per id of ``token_ids``, when the request asked
    tool_calls: list[dict[str, Any]] | None = None  # tool-call deltas (chunk ``tool_calls``)


Outgoing = Union[Message, Progress]


def request_timings(base_s: float, admitted_s: float, first_token_s: float, now_s: float) -> dict[str, float]:
    """``done`` timings, measured from broker acceptance; ``base_s`` is broker queue time minus worker arrival.

    A stage not reached yet (time 0) counts as reached now.
    """
    return {"queue_s": base_s + (admitted_s or now_s), "ttft_s": base_s + (first_token_s or now_s),
            "total_s": base_s + now_s}


@dataclass
class _Output:
    """One completion's output so far, as the I/O thread keeps it."""

    text: list[str] = field(default_factory=list)  # the whole text so far
    chars: int = 0  # its length
    token_ids: list[int] = field(default_factory=list)  # every id so far
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # one per id, when asked for
    released: int = 0  # streamed: ids sent (the rest wait for their text)


@dataclass
class _Open:
    """A request this worker holds (or has just answered), as the I/O thread knows it."""

    key: str
    dispatch: Dispatch
    arrived_s: float
    progress: Progress
    outputs: dict[int, _Output] = field(default_factory=dict)  # by completion index
    kept_bytes: int = 0  # what its output counts against the budget
    terminal: Message | None = None  # answered: its done or error, kept to send again
    sent_s: float | None = None  # when the terminal last went out; None: not yet

    def output(self, index: int) -> _Output:
        """Completion ``index``'s output."""
        out = self.outputs.get(index)
        if out is None:
            out = self.outputs[index] = _Output()
        return out

    @property
    def chars(self) -> int:
        """Characters of text so far, all completions."""
        return sum(o.chars for o in self.outputs.values())

    @property
    def started(self) -> bool:
        """Whether a streamed request has sent output."""
        return self.stream and any(o.chars or o.released for o in self.outputs.values())

    @property
    def stream(self) -> bool:
        """True when its output goes out as chunks."""
        return self.dispatch.request.stream

    @property
    def base_s(self) -> float:
        """Broker queue time minus arrival here: adds to clock times to measure from acceptance."""
        return self.dispatch.queue_s - self.arrived_s


class ReplyLedger:
    """The requests the worker holds, from the I/O thread's side; at most one terminal reply each."""

    def __init__(self, clock: Clock, *, budget_bytes: int = 64 * 1024 * 1024, linger_s: float = 6.0,
                 max_rows: int = MAX_TABLE_ROWS) -> None:
        self.clock = clock
        self.budget_bytes = budget_bytes
        self.linger_s = linger_s
        self.max_rows = max_rows
        self.away = False  # no broker has our table: output is kept, not sent
        self.kept_bytes = 0
        self._open: dict[str, _Open] = {}
        self._answered: set[str] = set()  # answered here; the session's word on them is dropped
        self._overflowed: list[str] = []  # ended for the budget: the loop must drop them
        self._next_expiry_s = 0.0

    @property
    def in_flight(self) -> int:
        """Requests dispatched to this worker and not yet answered."""
        return sum(1 for rec in self._open.values() if rec.terminal is None)

    @property
    def held(self) -> int:
        """Requests kept: in flight, and answered ones kept to send again."""
        return len(self._open)

    def opened(self, msg: Dispatch, arrived_s: float) -> None:
        """A dispatch arrived at ``arrived_s`` (the clock time the session is told too)."""
        key = msg.request.request_id  # the broker's own key
        if key not in self._answered:
            self._forget(key)  # an answered request under the same key is superseded
            self._open[key] = _Open(key, msg, arrived_s, Progress(key))

    def cancel(self, key: str) -> list[Message]:
        """Answer a cancel now: ``done`` (cancelled) with what is known; [] for a request not in flight."""
        rec = self._open.get(key)
        if rec is None or rec.terminal is not None:
            return []
        self._answered.add(key)
        p = rec.progress
        usage = {"prompt_tokens": p.prompt_tokens, "completion_tokens": p.completion_tokens, "cached_tokens": 0}
        done = Done(key, "cancelled", usage, request_timings(rec.base_s, p.admitted_s, p.first_token_s, self.clock.now()))
        if rec.dispatch.request.n > 1:
            done.choices = [{"index": i, "finish_reason": "cancelled", "completion_tokens": len(rec.output(i).token_ids)}
                            for i in range(rec.dispatch.request.n)]
        return self._close(rec, done)

    def take(self, items: Iterable[Outgoing]) -> list[Message]:
        """The wire messages for what the session said, in order (to send unless ``away``)."""
        out: list[Message] = []
        for item in items:
            key = item.key if isinstance(item, Progress) else getattr(item, "request_id", None)
            if key is not None and key in self._answered:
                if isinstance(item, (Done, Error)):
                    self._answered.discard(key)  # the session let go of it too
                continue
            rec = self._open.get(key) if key is not None else None
            if rec is None:
                if not isinstance(item, Progress):
                    out.append(item)
            elif rec.terminal is not None:
                continue  # answered already
            elif isinstance(item, Progress):
                self._progress(rec, item, out)
            elif isinstance(item, (Done, Error)):
                out += self._close(rec, item)
            else:
                out.append(item)
        return out

    def output_of(self, key: str) -> tuple[Generate, str, list[int]] | None:
        """A request kept here: what it asked, and its first completion's whole output so far (text and ids)."""
        rec = self._open.get(key)
        if rec is None:
            return None
        out = rec.outputs.get(0) or _Output()
        return rec.dispatch.request, "".join(out.text), list(out.token_ids)

    def take_overflowed(self) -> list[str]:
        """Keys ended for the budget since the last call: the loop must stop decoding them."""
        keys, self._overflowed = self._overflowed, []
        return keys

    def reset(self) -> None:
        """Forget everything: no broker will take these requests."""
        self._open.clear()
        self._answered.clear()
        self._overflowed.clear()
        self.kept_bytes = 0

    # ---- a lost broker -------------------------------------------------------------------

    def go_away(self) -> None:
        """The broker is lost: keep output from now on, within the budget (the largest requests end first)."""
        self.away = True
        for rec in sorted(self._open.values(), key=lambda r: -r.kept_bytes):
            if self.kept_bytes <= self.budget_bytes:
                break
            if rec.terminal is None:
                self._overflow(rec)

    def table(self) -> list[dict[str, Any]]:
        """The in-flight table for ``ready``: one map per request kept (docs/protocol.md).

        Past ``max_rows``, the answered requests that went out longest ago are forgotten.
        """
        answered = sorted((r for r in self._open.values() if r.terminal is not None), key=lambda r: r.sent_s or 0.0)
        for rec in answered[: max(0, len(self._open) - self.max_rows)]:
            self._forget(rec.key)
        now = self.clock.now()
        return [_entry(rec, now) for rec in self._open.values()]

    def replay(self) -> list[Message]:
        """Every kept request's output from its start, then its terminal if answered; sent after ``ready``.

        The caller clears ``away`` once these have gone out.
        """
        now = self.clock.now()
        out: list[Message] = []
        for rec in self._open.values():
            for i, o in sorted(rec.outputs.items()):
                if rec.stream and (o.chars or o.released):
                    out.append(Chunk(rec.key, "".join(o.text), o.token_ids[: o.released], 0, 0, index=i,
                                     logprobs=o.logprobs[: o.released] or None))
            if rec.terminal is not None:
                out.append(rec.terminal)
                rec.sent_s = now
        return out

    def expire(self) -> None:
        """Forget answered requests whose terminal went out more than ``linger_s`` ago (looked at a few times a linger)."""
        now = self.clock.now()
        if self.away or now < self._next_expiry_s:
            return
        self._next_expiry_s = now + self.linger_s / 8
        for key in [k for k, r in self._open.items() if r.sent_s is not None and now - r.sent_s >= self.linger_s]:
            self._forget(key)

    # ---- internals -------------------------------------------------------------------------

    def _progress(self, rec: _Open, p: Progress, out: list[Message]) -> None:
        added = len(p.text.encode("utf-8")) + ID_BYTES * len(p.token_ids)
        added += sum(LOGPROB_BYTES * (1 + len(e.get("top_logprobs", ()))) for e in p.logprobs or ())
        if self.away and added and self.kept_bytes + added > self.budget_bytes:
            self._overflow(rec)
            return
        rec.progress = p
        o = rec.output(p.index)
        o.token_ids += p.token_ids
        o.logprobs += p.logprobs or []
        rec.kept_bytes += added
        self.kept_bytes += added
        if p.text or p.tool_calls:
            o.text.append(p.text)
            if rec.stream:  # held-back text keeps its ids waiting
                out.append(Chunk(rec.key, p.text, o.token_ids[o.released:], o.chars, o.released, index=p.index,
                                 logprobs=o.logprobs[o.released:] or None, tool_calls=p.tool_calls))
                o.released = len(o.token_ids)
            o.chars += len(p.text)

    def _close(self, rec: _Open, terminal: Message) -> list[Message]:
        """The last messages of a request: pending ids first (streamed), text into the done (not streamed)."""
        out: list[Message] = []
        if isinstance(terminal, Done):
            if not rec.stream:
                _fill_done(terminal, rec)
            for i, o in sorted(rec.outputs.items()):
                if rec.stream and o.released < len(o.token_ids):
                    out.append(Chunk(rec.key, "", o.token_ids[o.released:], o.chars, o.released, index=i,
                                     logprobs=o.logprobs[o.released:] or None))
                    o.released = len(o.token_ids)
        rec.terminal = terminal
        rec.sent_s = None if self.away else self.clock.now()
        return out + [terminal]

    def _overflow(self, rec: _Open) -> None:
        """End ``rec`` with worker_lost: its output will not fit while the broker is away."""
        self._answered.add(rec.key)
        self._overflowed.append(rec.key)
        err = Error(WORKER_LOST, f"the worker's output buffer (recovery_buffer_bytes={self.budget_bytes}) filled up "
                    "while its broker was away; the output of this request could not be kept", rec.key)
        self._release(rec)
        rec.terminal, rec.sent_s = err, None

    def _release(self, rec: _Open) -> None:
        self.kept_bytes -= rec.kept_bytes
        rec.kept_bytes = 0
        rec.outputs = {}

    def _forget(self, key: str) -> None:
        rec = self._open.pop(key, None)
        if rec is not None:
            self.kept_bytes -= rec.kept_bytes


def _fill_done(done: Done, rec: _Open) -> None:
    """A non-streamed request's output into its ``done``: the text, or with n > 1 each choice's."""
    asked = rec.dispatch.request.logprobs
    if done.choices is None:
        o = rec.output(0)
        done.text, done.token_ids = "".join(o.text), list(o.token_ids)
        if asked:
            done.logprobs = list(o.logprobs)
        return
    for choice in done.choices:
        o = rec.output(int(choice["index"]))
        choice["text"], choice["token_ids"] = "".join(o.text), list(o.token_ids)
        if asked:
            choice["logprobs"] = list(o.logprobs)


def _entry(rec: _Open, now_s: float) -> dict[str, Any]:
    """One row of the in-flight table."""
    req = rec.dispatch.request
    entry: dict[str, Any] = {
        "request_id": rec.key, "client": rec.dispatch.client or "",
        "client_request_id": rec.dispatch.client_request_id or "", "stream": req.stream,
        "started": rec.started, "finished": rec.terminal is not None,
        "completion_tokens": rec.progress.completion_tokens, "text_chars": rec.chars, "priority": req.priority,
    }
    if req.timeout_s is not None:
        entry["timeout_s"] = max(0.001, req.timeout_s - (now_s - rec.arrived_s))
    if req.affinity is not None:
        entry["affinity"] = req.affinity
    return entry
