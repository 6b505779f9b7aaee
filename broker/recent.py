"""The last minute of replies, per worker: what `status` (and so `mlx-fleet top`) shows as rates. Pure, a clock.

Every ``done`` and ``error`` a worker sends passes through the broker, so the broker keeps a
short window of them (``window_s``, a minute by default) and answers from it: generated tokens
per second, TTFT p50/p99 (``timings.ttft_s``, measured from the broker's acceptance, as the
collector's histogram is), and the prompt-cache hit rate (prompt tokens reused from a prompt
cache, ``usage.cached_tokens``, over all prompt tokens). A rate is over the window, or over the
time since this broker started when that is shorter, so a restarted broker does not show half rates.

Bounds: at most ``max_samples`` replies per worker are kept, and at most ``max_workers``
workers (the one that replied longest ago goes first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from actors.clock import Clock
from actors.stats import percentile

WINDOW_S = 60.0
MAX_SAMPLES = 4096
MAX_WORKERS = 1024


@dataclass(frozen=True, slots=True)
class _Reply:
    at_s: float
    ok: bool  # a done (of any finish reason) rather than an error
    ttft_s: float | None  # None: no token came (cancelled before one, or an error)
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31 else 0


def _reply(now_s: float, raw: dict[str, Any]) -> _Reply:
    """One terminal map from a worker, read defensively (a worker is trusted, not infallible)."""
    usage, timings = raw.get("usage"), raw.get("timings")
    usage = usage if isinstance(usage, dict) else {}
    timings = timings if isinstance(timings, dict) else {}
    ok = raw.get("type") == "done"
    completion = _count(usage.get("completion_tokens"))
    ttft = timings.get("ttft_s")
    has_ttft = isinstance(ttft, (int, float)) and not isinstance(ttft, bool) and ttft >= 0 and ok and completion > 0
    return _Reply(now_s, ok, float(ttft) if has_ttft and ttft is not None else None, completion,
                  _count(usage.get("prompt_tokens")), _count(usage.get("cached_tokens")))


class RecentReplies:
    """Per worker id, the replies of the last ``window_s`` seconds, and what they add up to."""

    def __init__(self, clock: Clock, *, window_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES,
                 max_workers: int = MAX_WORKERS) -> None:
        self.clock = clock
        self.window_s = window_s
        self.max_samples = max_samples
        self.max_workers = max_workers
        self.started_s = clock.now()
        self._by_worker: OrderedDict[str, deque[_Reply]] = OrderedDict()

    def add(self, worker_id: str, raw: dict[str, Any]) -> None:
        """A worker's ``done`` or ``error`` map, just received."""
        now = self.clock.now()
        replies = self._by_worker.get(worker_id)
        if replies is None:
            replies = self._by_worker[worker_id] = deque(maxlen=self.max_samples)
        self._by_worker.move_to_end(worker_id)
        replies.append(_reply(now, raw))
        while len(self._by_worker) > self.max_workers:
            self._by_worker.popitem(last=False)

    def summary(self, worker_ids: Iterable[str]) -> dict[str, Any]:
        """The window's figures over the replies of ``worker_ids`` (one replica, or a model's replicas)."""
        now = self.clock.now()
        since = now - self.window_s
        window: list[_Reply] = []
        for wid in worker_ids:
            replies = self._by_worker.get(wid)
            if replies is None:
                continue
            while replies and replies[0].at_s < since:
                replies.popleft()
            window += replies
        span_s = max(1.0, min(self.window_s, now - self.started_s))
        ttfts = [r.ttft_s for r in window if r.ttft_s is not None]
        prompt = sum(r.prompt_tokens for r in window if r.ok)
        return {
            "window_s": round(span_s, 3), "requests": sum(1 for r in window if r.ok),
            "errors": sum(1 for r in window if not r.ok),
            "tok_per_s": round(sum(r.completion_tokens for r in window if r.ok) / span_s, 3),
            "ttft_p50_s": round(percentile(ttfts, 50), 4) if ttfts else None,
            "ttft_p99_s": round(percentile(ttfts, 99), 4) if ttfts else None,
            "cache_hit_rate": round(sum(r.cached_tokens for r in window if r.ok) / prompt, 4) if prompt else None,
        }
