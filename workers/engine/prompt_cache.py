"""The worker's prompt cache: a bounded LRU of KV caches keyed by the token ids they hold.

Chat traffic resends the system prompt and the conversation so far on every turn. When
a sequence finishes, the engine stores its KV cache (prompt plus generated tokens) here,
keyed by exactly those tokens. A later prompt that shares a prefix with an entry is
given a private copy of the entry cut to the shared prefix, and only the rest of the
prompt is prefilled. An entry is never handed out itself, so a running sequence can
never change what is stored.

This module is pure: it never imports mlx. The engine injects how to measure a cache
(``size_of``) and how to copy the first ``keep`` of its ``held`` tokens
(``copy_prefix(kv, held, keep)``); with mlx-lm
those are ``sum(c.nbytes)`` and ``copy.deepcopy`` plus ``trim_prompt_cache``; ``can_trim``
(``can_trim_prompt_cache``) says whether an entry may be cut at all.

Bounds: at most ``max_entries`` entries and ``max_bytes`` bytes, evicting the least
recently used (a hit or a store counts as a use). An entry larger than ``max_bytes`` is
never stored, so one long sequence cannot flush the rest. The bound covers what the
cache holds; sequences that are running own their KV until they finish.

Why not ``mlx_lm``'s ``LRUPromptCache`` (mlx-lm 0.32.2): a hit does not refresh an
entry's place, which moves only when it is stored again, and its order is split by
segment type, so its eviction is not least recently used; an entry over ``max_bytes``
evicts every other entry before being evicted itself; an exact match returns an empty
remainder, which ``BatchGenerator.insert`` refuses; it counts no hits or misses. What is
reused from mlx-lm is the cache machinery itself: the caches ``BatchGenerator`` hands
back, ``trim_prompt_cache``, ``can_trim_prompt_cache``, ``nbytes`` and
``insert(caches=..., all_tokens=...)``.

Routing: the cache is per worker process, so a conversation only hits it when its turns
reach the same replica. Each entry carries a label (the key of the request that stored it);
the worker reports the prefix keys of the entries it holds (:mod:`workers.prefix_report`),
and the broker sends a request to the replica holding the longest prefix of it
(:mod:`broker.routing`), unless the replicas' loads are out of balance. An ``affinity`` key
still pins every request of a conversation to one replica while that replica lives.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

KV = TypeVar("KV")

# Shorter shared prefixes (a chat template's header, a BOS) are not worth copying an entry for.
DEFAULT_MIN_HIT_TOKENS = 8


@dataclass
class PromptCacheStats:
    """Counters and gauges of one prompt cache; plain ints, safe to forward as metrics."""

    hits: int = 0  # lookups that reused at least min_hit_tokens
    misses: int = 0
    bypassed: int = 0  # requests that opted out (``cache: false``)
    hit_tokens: int = 0  # prompt tokens whose prefill was skipped
    lookup_tokens: int = 0  # prompt tokens of all lookups
    stored: int = 0
    evicted: int = 0
    rejected: int = 0  # entries over max_bytes, never stored
    entries: int = 0
    bytes_held: int = 0
    forks: int = 0  # sequences started from a copy of another's prefill (n > 1 completions)
    fork_tokens: int = 0  # prompt tokens whose prefill those forks skipped

    def as_dict(self, prefix: str = "prompt_cache_") -> dict[str, int]:
        """A flat map, each name with ``prefix`` (for heartbeats and collectors)."""
        return {prefix + k: int(v) for k, v in vars(self).items()}


@dataclass
class _Entry(Generic[KV]):
    tokens: tuple[int, ...]
    kv: KV
    nbytes: int
    trimmable: bool
    label: str = ""  # who stored it (the request's key): the worker reports its prefix keys under it


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items ``a`` and ``b`` share (binary search over C-speed slice compares)."""
    if type(a) is not type(b):  # a list slice never equals a tuple slice
        a, b = tuple(a), tuple(b)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PromptCache(Generic[KV]):
    """LRU of KV caches bounded by entries and bytes; ``max_entries`` or ``max_bytes`` 0 disables it.

    Driven from the engine's one thread; not thread-safe.
    """

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        size_of: Callable[[KV], int],
        copy_prefix: Callable[[KV, int, int], KV],
        can_trim: Callable[[KV], bool] = lambda kv: True,
        min_hit_tokens: int = DEFAULT_MIN_HIT_TOKENS,
    ) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("max_entries and max_bytes must be >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size_of = size_of
        self.copy_prefix = copy_prefix
        self.can_trim = can_trim
        self.min_hit_tokens = max(1, min_hit_tokens)
        self.stats = PromptCacheStats()
        self._entries: OrderedDict[tuple[int, ...], _Entry[KV]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """False when either bound is 0: nothing is ever stored."""
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple[int, ...]]:
        """Stored token sequences, least recently used first."""
        return list(self._entries)

    def labels(self) -> list[str]:
        """The labels of the entries held now, least recently used first (what the broker's index mirrors)."""
        return [e.label for e in self._entries.values()]

    def bypass(self) -> None:
        """Count a request that opted out of the cache."""
        self.stats.bypassed += 1

    def _usable(self, entry: _Entry[KV], tokens: Sequence[int]) -> int:
        """Tokens of ``entry`` a prompt ``tokens`` could reuse (0 when none)."""
        # At least one prompt token is always prefilled: it yields the first logits.
        n = min(common_prefix_len(entry.tokens, tokens), len(tokens) - 1)
        if n < len(entry.tokens) and not entry.trimmable:
            return 0
        return n

    def lookup(self, tokens: Sequence[int]) -> tuple[KV | None, int]:
        """A private copy of the best entry cut to the shared prefix, and that prefix's length.

        ``(None, 0)`` on a miss. Among equally long matches the smallest entry is copied.
        """
        if not self.enabled:
            return None, 0
        tokens = tuple(tokens)
        best: _Entry[KV] | None = None
        best_n = 0
        for entry in self._entries.values():
            n = self._usable(entry, tokens)
            if n > best_n or (n == best_n and best is not None and entry.nbytes < best.nbytes):
                best, best_n = entry, n
        self.stats.lookup_tokens += len(tokens)
        if best is None or best_n < self.min_hit_tokens:
            self.stats.misses += 1
            return None, 0
        self._entries.move_to_end(best.tokens)
        self.stats.hits += 1
        self.stats.hit_tokens += best_n
        return self.copy_prefix(best.kv, len(best.tokens), best_n), best_n

    def store(self, tokens: Sequence[int], kv: KV, label: str = "") -> bool:
        """Keep ``kv`` (the cache of exactly ``tokens``) under ``label``; evict LRU entries to stay in bounds.

        The cache takes ownership of ``kv``. Returns False when it is not kept. When a
        longer entry starting with ``tokens`` exists, that entry is marked used instead.
        """
        if not self.enabled or not tokens:
            return False
        nbytes = int(self.size_of(kv))
        if nbytes > self.max_bytes:
            self.stats.rejected += 1
            return False
        key = tuple(tokens)
        covering = next((k for k, e in self._entries.items()
                         if e.trimmable and len(k) > len(key) and k[: len(key)] == key), None)
        if covering is not None:  # a longer entry serves every prefix of this one already
            self._entries.move_to_end(covering)
            return True
        trimmable = bool(self.can_trim(kv))
        self._drop(key)
        if trimmable:
            # An entry that is a prefix of this one is served as well by trimming this one.
            for old in [k for k in self._entries if len(k) < len(key) and key[: len(k)] == k]:
                self._drop(old)
        while self._entries and (len(self._entries) >= self.max_entries or self.stats.bytes_held + nbytes > self.max_bytes):
            self._drop(next(iter(self._entries)))
            self.stats.evicted += 1
        self._entries[key] = _Entry(key, kv, nbytes, trimmable, label)
        self.stats.bytes_held += nbytes
        self.stats.entries = len(self._entries)
        self.stats.stored += 1
        return True

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.stats.bytes_held -= entry.nbytes
            self.stats.entries = len(self._entries)

    def clear(self) -> None:
        """Forget every entry (counters stay)."""
        self._entries.clear()
        self.stats.bytes_held = 0
        self.stats.entries = 0
