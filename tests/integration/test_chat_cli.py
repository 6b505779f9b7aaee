"""`mlx-fleet chat` on a pseudo-terminal: Ctrl-C cancels the answer in the fleet, the session goes on."""

from __future__ import annotations

import sys

import pytest

from tests.integration.fleets import fleet_status, running_fleet
from tests.integration.terminal import Terminal
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LONG_TOKENS = 20_000  # minutes of decoding: only a cancel ends it within the test


def running(frontend: str) -> int:
    return fleet_status(frontend)["models"]["demo"]["running"]


def test_ctrl_c_cancels_the_answer_in_the_fleet_and_the_session_goes_on() -> None:
    with running_fleet() as fleet:
        frontend = fleet.cfg.frontend
        term = Terminal([sys.executable, "-m", "mlx_fleet", "chat", "--model", "demo", "--connect", frontend,
                         "--max-tokens", str(LONG_TOKENS)])
        try:
            at = term.expect(">>> ")
            term.type("Tell me a very long story.\n")
            at = term.expect("story.\r\n", after=at)  # the echo of what was typed
            # Keep reading meanwhile: Ctrl-C should find chat streaming, not blocked on a full terminal.
            wait_for(lambda: term.read_ready() or running(frontend) == 1, timeout_s=30, what="the answer to be decoding")
            term.expect(" ", after=at)  # some of the answer is on the screen
            term.type("\x03")  # Ctrl-C: the terminal sends SIGINT to chat
            at = term.expect("(answer cancelled)", after=at)
            wait_for(lambda: term.read_ready() or running(frontend) == 0, timeout_s=10,
                     what="the fleet to drop the cancelled answer")
            term.expect(">>> ", after=at)  # the session goes on
            term.type("/bye\n")
            assert term.wait() == 0
        finally:
            term.kill()
