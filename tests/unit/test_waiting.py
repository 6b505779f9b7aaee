"""The one way tests wait: tests/waiting.py, on conditions that are already decided (no time passes)."""

from __future__ import annotations

import pytest

from tests.waiting import assert_never, wait_for

pytestmark = pytest.mark.timeout(10)


def test_wait_for_returns_the_first_truthy_value() -> None:
    values = iter([0, None, "", "here"])
    assert wait_for(lambda: next(values), 5, "a value", interval_s=0) == "here"


def test_wait_for_names_what_it_waited_for_and_what_it_saw() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0s waiting for the worker; seen: 'idle'"):
        wait_for(lambda: False, 0, "the worker", seen=lambda: "idle")


def test_wait_for_treats_only_the_ignored_errors_as_not_yet() -> None:
    with pytest.raises(AssertionError, match=r"waiting for a reply; last error: TimeoutError\('busy'\)"):
        wait_for(lambda: (_ for _ in ()).throw(TimeoutError("busy")), 0, "a reply", ignoring=(TimeoutError,))
    with pytest.raises(KeyError):
        wait_for(lambda: {}["missing"], 5, "a key", ignoring=(TimeoutError,))


def test_assert_never_fails_as_soon_as_the_event_happens() -> None:
    with pytest.raises(AssertionError, match="the rogue worker registering happened"):
        assert_never(lambda: True, 5, "the rogue worker registering")
    assert_never(lambda: False, 0, "nothing")
