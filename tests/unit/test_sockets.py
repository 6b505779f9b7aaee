"""Unit tests for actors.sockets' poll timeout: whole milliseconds, rounded up, never negative."""

from __future__ import annotations

import pytest

from actors.sockets import poll_ms

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(("timeout_s", "expected_ms"), [
    (0.0, 0),
    (0.0004, 1),  # under a millisecond: a real wait, not a busy poll(0)
    (0.001, 1),
    (0.0015, 2),
    (0.5, 500),
    (2.007, 2007),  # 2.007 * 1000.0 is 2007.0000000000002
    (2.0, 2000),
    (-0.25, 0),  # a deadline already past: zmq would wait forever on a negative timeout
])
def test_poll_ms(timeout_s: float, expected_ms: int) -> None:
    assert poll_ms(timeout_s) == expected_ms
