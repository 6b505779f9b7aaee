"""What a worker reports of its prompt cache's prefix keys (workers/prefix_report.py)."""

from __future__ import annotations

import pytest

from actors.protocol import Prefixes
from workers.prefix_report import PrefixReporter

pytestmark = pytest.mark.timeout(30)


def keys_of(reports: list[Prefixes]) -> tuple[list[bool], list[int], list[int]]:
    return ([r.full for r in reports], sorted(k for r in reports for k in r.added),
            sorted(k for r in reports for k in r.removed))


def test_the_first_report_is_full_then_only_changes() -> None:
    rep = PrefixReporter("w")
    assert keys_of(rep.reports()) == ([True], [], [])  # a fresh worker: an empty cache, said in full
    rep.finished("r1", [1, 2, 3])
    assert rep.reports() == []  # not in the cache yet
    rep.cache_now(["r1"])
    assert keys_of(rep.reports()) == ([False], [1, 2, 3], [])
    rep.finished("r2", [1, 2, 4])
    rep.cache_now(["r2"])  # r1's entry went (r2's extends it), r2's came
    assert keys_of(rep.reports()) == ([False], [4], [3])  # 1 and 2 stay: r2 holds them too
    assert rep.reports() == []


def test_a_key_stays_while_any_entry_holds_it() -> None:
    rep = PrefixReporter("w")
    rep.reports()
    rep.finished("a", [1, 2])
    rep.finished("b", [1, 3])
    rep.cache_now(["a", "b"])
    rep.reports()
    rep.cache_now(["b"])
    assert keys_of(rep.reports()) == ([False], [], [2])
    rep.cache_now([])
    assert keys_of(rep.reports()) == ([False], [], [1, 3])
    assert rep.keys_held == 0


def test_owing_a_full_report_sends_everything_held() -> None:
    rep = PrefixReporter("w")
    rep.finished("a", [5, 6])
    rep.cache_now(["a"])
    rep.reports()
    rep.owe_full()  # a new broker: it knows nothing
    rep.finished("b", [7])
    rep.cache_now(["a", "b"])
    assert keys_of(rep.reports()) == ([True], [5, 6, 7], [])


def test_entries_whose_keys_were_never_known_count_as_none() -> None:
    rep = PrefixReporter("w", max_pending=2)
    for label in ("a", "b", "c"):
        rep.finished(label, [ord(label)])
    rep.cache_now(["a", "c"])  # a's keys were dropped past max_pending
    assert rep.unknown == 1
    assert keys_of(rep.reports()) == ([True], [ord("c")], [])


def test_long_reports_are_split() -> None:
    rep = PrefixReporter("w", max_report=4)
    rep.finished("a", list(range(10)))
    rep.cache_now(["a"])
    reports = rep.reports()
    assert [len(r.added) for r in reports] == [4, 4, 2] and [r.full for r in reports] == [True, False, False]
    rep.cache_now([])
    rep.finished("b", [20, 21, 22])
    rep.cache_now(["b"])
    reports = rep.reports()
    assert all(len(r.added) + len(r.removed) <= 4 for r in reports)
    assert keys_of(reports) == ([False, False, False, False], [20, 21, 22], list(range(10)))
