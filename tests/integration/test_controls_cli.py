"""``mlx-fleet generate`` with a grammar or logprobs, run as docs/clients.md writes it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.fleets import RunningFleet, start_fleet
from tests.integration.processes import cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "people": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["city", "people"], "additionalProperties": False}


@pytest.fixture(scope="module")
def fleet() -> Iterator[RunningFleet]:
    running = start_fleet(transport="tcp", models=(("demo", "demo", 1),))
    try:
        yield running
    finally:
        running.stop()


def test_json_schema_regex_and_choice(fleet: RunningFleet, tmp_path: Path) -> None:
    (tmp_path / "city.json").write_text(json.dumps(SCHEMA))
    addr = ["--connect", fleet.cfg.frontend]
    out = cli("generate", "--model", "demo", "--json-schema", str(tmp_path / "city.json"), *addr, "A city:")
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) == {"city", "people"}
    out = cli("generate", "--model", "demo", "--regex", "[0-9]{3}-[0-9]{4}", *addr, "A phone number:")
    assert out.returncode == 0 and re.fullmatch("[0-9]{3}-[0-9]{4}", out.stdout.strip()), out
    out = cli("generate", "--model", "demo", "--choice", "yes,no", *addr, "Is it raining?")
    assert out.returncode == 0 and out.stdout.strip() in ("yes", "no"), out


def test_logprobs_go_to_stderr_one_line_per_token(fleet: RunningFleet) -> None:
    out = cli("generate", "--model", "demo", "--max-tokens", "5", "--logprobs", "2",
              "--connect", fleet.cfg.frontend, "The capital of France is")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "top:" in line]
    assert len(lines) == 5 and all(float(line.split()[0]) <= 0 for line in lines)


def test_a_bad_schema_or_grammar_fails_with_one_line(fleet: RunningFleet, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    out = cli("generate", "--model", "demo", "--json-schema", str(tmp_path / "bad.json"), "x")
    assert out.returncode == 2 and out.stderr.startswith("mlx-fleet: error: --json-schema")
    out = cli("generate", "--model", "demo", "--regex", "([", "--connect", fleet.cfg.frontend, "x")
    assert out.returncode == 1 and "bad_request" in out.stderr and "grammar" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
