"""``mlx-fleet generate`` when it fails: its grammar flags (test_documented_commands.py runs the documented ones), a closed pipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.fleets import RunningFleet, start_fleet
from tests.integration.processes import ROOT, cli

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


def test_a_reader_that_goes_away_stops_generate_quietly(fleet: RunningFleet) -> None:
    """``mlx-fleet generate ... | head -c 5``: the closed pipe ends it with 141 and no traceback."""
    gen = subprocess.Popen([sys.executable, "-m", "mlx_fleet", "generate", "--model", "demo", "--max-tokens", "400",
                            "--connect", fleet.cfg.frontend, "Tell me a long story."], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert gen.stdout is not None and gen.stderr is not None
    gen.stdout.read(5)
    gen.stdout.close()  # as `head -c 5` exits
    err = gen.stderr.read().decode()
    assert gen.wait(timeout=60) == 141, err
    assert "Traceback" not in err, err
