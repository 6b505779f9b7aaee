"""A worker's replies to the broker, assembled where they are sent: pure, a clock.

The worker's session (:mod:`workers.session`) runs on the MLX thread and says what
happened to each request: :class:`Progress` (new text and token ids, usage so far) and
the terminal ``done`` or ``error``. The I/O thread feeds those to a :class:`ReplyLedger`,
which turns them into wire messages:

- a streamed request's output goes out as ``chunk`` messages; token ids whose text is
  held back wait for it, and any left go out in one last chunk before the ``done``;
- a non-streamed request's text and ids are gathered here and put into its ``done``;
- a ``cancel`` is answered at once, even in the middle of an engine step: ``done`` with
  ``finish_reason: "cancelled"``, the usage known so far, and the text so far when not
  streamed. Whatever the session still says about that request afterwards, its own
  ``done`` included, is dropped: every request gets exactly one terminal reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Union

from actors.clock import Clock
from actors.protocol import Chunk, Dispatch, Done, Error, Message


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


Outgoing = Union[Message, Progress]


def request_timings(base_s: float, admitted_s: float, first_token_s: float, now_s: float) -> dict[str, float]:
    """``done`` timings, measured from broker acceptance; ``base_s`` is broker queue time minus worker arrival.

    A stage not reached yet (time 0) counts as reached now.
    """
    return {"queue_s": base_s + (admitted_s or now_s), "ttft_s": base_s + (first_token_s or now_s),
            "total_s": base_s + now_s}


@dataclass
class _Open:
    """A request this worker holds, as the I/O thread knows it."""

    key: str
    stream: bool
    base_s: float
    progress: Progress
    text: list[str] = field(default_factory=list)  # not streamed: the whole text so far
    token_ids: list[int] = field(default_factory=list)  # streamed: ids waiting for text; else all ids


class ReplyLedger:
    """The requests the worker holds, from the I/O thread's side; at most one terminal reply each."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._open: dict[str, _Open] = {}
        self._answered: set[str] = set()  # cancelled here; the session's word on them is dropped

    @property
    def in_flight(self) -> int:
        """Requests dispatched to this worker and not yet answered."""
        return len(self._open)

    def opened(self, msg: Dispatch, arrived_s: float) -> None:
        """A dispatch arrived at ``arrived_s`` (the clock time the session is told too)."""
        key = msg.request.request_id  # the broker's own key
        if key not in self._answered:
            self._open[key] = _Open(key, msg.request.stream, msg.queue_s - arrived_s, Progress(key))

    def cancel(self, key: str) -> list[Message]:
        """Answer a cancel now: ``done`` (cancelled) with what is known; [] for a request not held."""
        rec = self._open.pop(key, None)
        if rec is None:
            return []
        self._answered.add(key)
        p = rec.progress
        usage = {"prompt_tokens": p.prompt_tokens, "completion_tokens": p.completion_tokens, "cached_tokens": 0}
        done = Done(key, "cancelled", usage, request_timings(rec.base_s, p.admitted_s, p.first_token_s, self.clock.now()))
        return self._close(rec, done)

    def take(self, items: Iterable[Outgoing]) -> list[Message]:
        """The wire messages for what the session said, in order."""
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
            elif isinstance(item, Progress):
                self._progress(rec, item, out)
            elif isinstance(item, (Done, Error)):
                del self._open[rec.key]
                out += self._close(rec, item)
            else:
                out.append(item)
        return out

    def reset(self) -> None:
        """Forget everything: the broker no longer knows these requests."""
        self._open.clear()
        self._answered.clear()

    def _progress(self, rec: _Open, p: Progress, out: list[Message]) -> None:
        rec.progress = p
        rec.token_ids += p.token_ids
        if not rec.stream:
            rec.text.append(p.text)
        elif p.text:  # held-back text keeps its ids waiting
            out.append(Chunk(rec.key, p.text, rec.token_ids))
            rec.token_ids = []

    def _close(self, rec: _Open, terminal: Message) -> list[Message]:
        """The last messages of a request: pending ids first (streamed), text into the done (not streamed)."""
        if not isinstance(terminal, Done):
            return [terminal]
        if not rec.stream:
            terminal.text = "".join(rec.text)
            terminal.token_ids = rec.token_ids
            return [terminal]
        return ([Chunk(rec.key, "", rec.token_ids)] if rec.token_ids else []) + [terminal]
