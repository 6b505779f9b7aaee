"""``mlx-fleet generate``'s grammar flags when they fail (test_documented_commands.py runs the documented ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.fleets import RunningFleet, start_fleet
from tests.integration.processes import cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def fleet() -> Iterator[RunningFleet]:
    running = start_fleet(transport="tcp", models=(("demo", "demo", 1),))
    try:
        yield running
    finally:
        running.stop()


def test_a_bad_schema_or_grammar_fails_with_one_line(fleet: RunningFleet, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    out = cli("generate", "--model", "demo", "--json-schema", str(tmp_path / "bad.json"), "x")
    assert out.returncode == 2 and out.stderr.startswith("mlx-fleet: error: --json-schema")
    out = cli("generate", "--model", "demo", "--regex", "([", "--connect", fleet.cfg.frontend, "x")
    assert out.returncode == 1 and "bad_request" in out.stderr and "grammar" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
