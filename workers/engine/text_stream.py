"""Per-request text state for the engine: incremental detokenizing and stop strings.

Each stream has its own detokenizer (so multi-byte characters come out whole) and holds
back text that could be the start of a stop string until it is sure. Pure Python: no MLX.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """One request's detokenizer and stop-string state.

    ``req``: the engine's request (anything with ``key`` and ``stop``); ``path``: how it
    is decoded (see :mod:`workers.engine.stats`), kept up to date by the engine.
    """

    def __init__(self, req: Any, detokenizer: Any, path: str, index: int = 0) -> None:
        self.req = req
        self.index = index  # which of the request's completions
        self.stop: list[str] = list(req.stop)
        self.detok = detokenizer
        self.path = path
        self.text = ""  # decoded so far (stop strings search here)
        self.emitted = 0  # characters of ``text`` already handed out
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[dict[str, Any]] = []  # one per pending id, when the request asked
        self.tokens = 0
        self.cached_tokens = 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token: int | None, logprob: dict[str, Any] | None = None) -> None:
        """Append one generated token, with its logprob entry (None: only pick up what the detokenizer has since released)."""
        if token is not None:
            self.detok.add_token(token)
            self.pending_ids.append(token)
            if logprob is not None:
                self.pending_logprobs.append(logprob)
            self.tokens += 1
        self.text += self.detok.last_segment

    def find_stop(self) -> int:
        """Index in ``text`` where the earliest stop string starts, or -1."""
        start = max(0, self.emitted - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else -1

    def take_logprobs(self) -> list[dict[str, Any]] | None:
        """The logprob entries of the ids the last ``take`` returned (None when not asked for)."""
        if not self.pending_logprobs:
            return None
        out, self.pending_logprobs = self.pending_logprobs, []
        return out

    def take(self, upto: int | None = None) -> tuple[str, list[int]]:
        """Text ready to send (holding back a possible stop-string prefix) and pending ids."""
        if upto is None:
            upto = len(self.text) - (self._stop_prefix_len() if self.stop else 0)
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        ids, self.pending_ids = self.pending_ids, []
        return out, ids

    def _stop_prefix_len(self) -> int:
        tail = self.text[max(self.emitted, len(self.text) - self.hold):]
        for n in range(len(tail), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0
