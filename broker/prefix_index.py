"""The broker's mirror of each worker's prompt cache: the prefix keys it holds. Pure, a clock.

Workers report the prefix keys (:mod:`actors.prefix_keys`) of the entries their prompt cache
stores and evicts (``prefixes`` messages, :mod:`workers.prefix_report`). The index keeps one
set of keys per worker and answers how long a prefix of a request each one holds
(:meth:`PrefixIndex.matched`), which :mod:`broker.routing` uses to pick a replica.

It rebuilds itself from the workers' reports: a worker's entry is dropped when it goes or
registers again (a restarted worker starts with an empty cache), and every ``ready`` is
followed by a full report, so a restarted broker learns each cache whole. A report from a
worker the broker does not know is ignored (the broker asks it to register, and the full
report that follows its ``ready`` counts).

Bound: at most ``max_keys`` keys per worker; keys past it are not kept (counted in
``dropped``), so a worker cannot grow the broker's memory without limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from actors.clock import Clock
from actors.prefix_keys import matched_blocks
from actors.protocol import Prefixes

MAX_KEYS_PER_WORKER = 65_536  # 64 prompt-cache entries of 1024 blocks, twice over


@dataclass
class _Held:
    keys: set[int] = field(default_factory=set)
    reports: int = 0
    updated_s: float = 0.0


class PrefixIndex:
    """Per worker identity, the prefix keys of its prompt cache, as its reports said."""

    def __init__(self, clock: Clock, *, max_keys: int = MAX_KEYS_PER_WORKER) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self.dropped = 0  # keys not kept for the bound
        self._held: dict[bytes, _Held] = {}

    def apply(self, identity: bytes, report: Prefixes) -> None:
        """Fold in one report of a registered worker (``full``: it replaces what was known)."""
        held = self._held.get(identity)
        if held is None or report.full:
            held = self._held[identity] = _Held()
        held.keys.difference_update(report.removed)
        room = self.max_keys - len(held.keys)
        added = [k for k in report.added if k not in held.keys]
        if len(added) > room:
            self.dropped += len(added) - max(0, room)
            added = added[: max(0, room)]
        held.keys.update(added)
        held.reports += 1
        held.updated_s = self.clock.now()

    def forget(self, identity: bytes) -> None:
        """Drop what is known of a worker (gone, or registered again: its next full report counts)."""
        self._held.pop(identity, None)

    def matched(self, identity: bytes, keys: Sequence[int]) -> int:
        """How many leading ``keys`` (a request's prefix keys) worker ``identity`` holds."""
        held = self._held.get(identity)
        return 0 if held is None else matched_blocks(keys, held.keys)

    def size(self, identity: bytes) -> int:
        """Keys known for a worker."""
        held = self._held.get(identity)
        return 0 if held is None else len(held.keys)

    def view(self, identity: bytes) -> dict[str, float | int | None]:
        """A worker's entry for `status`: keys held, reports folded in, seconds since the last one."""
        held = self._held.get(identity)
        if held is None:
            return {"keys": 0, "reports": 0, "age_s": None}
        return {"keys": len(held.keys), "reports": held.reports, "age_s": round(self.clock.now() - held.updated_s, 3)}
