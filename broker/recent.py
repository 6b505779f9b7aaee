"""The last minute of replies, per worker: what `status` (and so `mlx-fleet top`) shows as rates. Pure, a clock.

Every ``done`` and ``error`` a worker sends passes through the broker, so the broker keeps a
short window of them (``window_s``, a minute by default) and answers from it: generated tokens
per second, TTFT p50/p99 (``timings.ttft_s``, measured from the broker's acceptance, as the
collector's histogram is), and the prompt-cache hit rate (prompt tokens reused from a prompt
cache, ``usage.cached_tokens``, over all prompt tokens). A rate is over the window, or over the
time since this broker started when that is shorter, so a restarted broker does not show half rates.

Bounds: at most ``max_samples`` replies per worker are kept (past that, the window is the
latest ``max_samples``), and at most ``max_workers`` workers (the one that replied longest ago
goes first). Each worker's sums run as replies come and go, and its TTFTs stay sorted, so a
`status` call costs little however busy the fleet.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from actors.clock import Clock

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


class _Window:
    """One worker's replies in the window, with running sums and its TTFTs kept sorted, so a summary is cheap."""

    def __init__(self, max_samples: int) -> None:
        self.replies: deque[_Reply] = deque()
        self.max_samples = max_samples
        self.ttfts: list[float] = []  # sorted
        self.requests = self.errors = self.tokens = self.prompt = self.cached = 0

    def add(self, r: _Reply) -> None:
        if len(self.replies) >= self.max_samples:
            self._drop()
        self.replies.append(r)
        if r.ttft_s is not None:
            bisect.insort(self.ttfts, r.ttft_s)
        self._count(r, 1)

    def expire(self, since_s: float) -> None:
        while self.replies and self.replies[0].at_s < since_s:
            self._drop()

    def _drop(self) -> None:
        r = self.replies.popleft()
        if r.ttft_s is not None:
            del self.ttfts[bisect.bisect_left(self.ttfts, r.ttft_s)]
        self._count(r, -1)

    def _count(self, r: _Reply, sign: int) -> None:
        if r.ok:
            self.requests += sign
            self.tokens += sign * r.completion_tokens
            self.prompt += sign * r.prompt_tokens
            self.cached += sign * r.cached_tokens
        else:
            self.errors += sign


class RecentReplies:
    """Per worker id, the replies of the last ``window_s`` seconds, and what they add up to."""

    def __init__(self, clock: Clock, *, window_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES,
                 max_workers: int = MAX_WORKERS) -> None:
        self.clock = clock
        self.window_s = window_s
        self.max_samples = max_samples
        self.max_workers = max_workers
        self.started_s = clock.now()
        self._by_worker: OrderedDict[str, _Window] = OrderedDict()

    def add(self, worker_id: str, raw: dict[str, Any]) -> None:
        """A worker's ``done`` or ``error`` map, just received."""
        window = self._by_worker.get(worker_id)
        if window is None:
            window = self._by_worker[worker_id] = _Window(self.max_samples)
        self._by_worker.move_to_end(worker_id)
        window.add(_reply(self.clock.now(), raw))
        while len(self._by_worker) > self.max_workers:
            self._by_worker.popitem(last=False)

    def summary(self, worker_ids: Iterable[str]) -> dict[str, Any]:
        """The window's figures over the replies of ``worker_ids`` (one replica, or a model's replicas)."""
        now = self.clock.now()
        windows = [w for w in (self._by_worker.get(wid) for wid in worker_ids) if w is not None]
        for w in windows:
            w.expire(now - self.window_s)
        span_s = max(1.0, min(self.window_s, now - self.started_s))
        ttfts = windows[0].ttfts if len(windows) == 1 else sorted(itertools.chain.from_iterable(w.ttfts for w in windows))
        prompt = sum(w.prompt for w in windows)
        return {
            "window_s": round(span_s, 3), "requests": sum(w.requests for w in windows),
            "errors": sum(w.errors for w in windows),
            "tok_per_s": round(sum(w.tokens for w in windows) / span_s, 3),
            "ttft_p50_s": round(_sorted_percentile(ttfts, 50), 4) if ttfts else None,
            "ttft_p99_s": round(_sorted_percentile(ttfts, 99), 4) if ttfts else None,
            "cache_hit_rate": round(sum(w.cached for w in windows) / prompt, 4) if prompt else None,
        }


def _sorted_percentile(ordered: list[float], q: float) -> float:
    """actors.stats.percentile's linear interpolation, on values already sorted."""
    rank = q / 100.0 * (len(ordered) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)
