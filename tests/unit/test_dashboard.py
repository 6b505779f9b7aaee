"""The Grafana dashboard and docs/metrics.md refer only to metrics the collector exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.unit.test_collector_state import broker_event, make_state, request_event, scrape, step_event

pytestmark = pytest.mark.timeout(30)

DOCS = Path(__file__).resolve().parents[2] / "docs"
SUFFIXES = ("_bucket", "_count", "_sum")


def exposed_families() -> set[str]:
    """Every family name a populated collector renders (histogram samples folded to their family)."""
    state, _ = make_state()
    state.apply(request_event("a"))
    state.apply(step_event("a"))
    state.apply(broker_event({"a": {"a-0": "idle"}, "b": {}}))
    state.apply({"type": "supervisor", "source": "supervisor", "dropped": 0,
                 "workers": [{"worker": "a-0", "model": "a", "restarts": 0, "alive": True, "gave_up": False}]})
    names = set()
    for name in scrape(state):
        for suffix in SUFFIXES:
            if name.endswith(suffix) and not name.endswith("_total"):
                name = name[: -len(suffix)]
        names.add(name)
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def referenced(text: str) -> set[str]:
    names = set()
    for name in re.findall(r"mlxfleet_[a-z0-9_]+", text):
        for suffix in SUFFIXES:
            if name.endswith(suffix) and not name.endswith("_total"):
                name = name[: -len(suffix)]
        names.add(name)
    return names


def test_dashboard_uses_only_exposed_metrics_and_shows_them_all() -> None:
    exposed = exposed_families()
    used = set().union(*(referenced(e) for e in dashboard_exprs()))
    assert used <= exposed, used - exposed
    assert used == exposed, exposed - used


def test_metrics_doc_lists_every_metric() -> None:
    doc = (DOCS / "metrics.md").read_text()
    table = {m for m in re.findall(r"^\| `(mlxfleet_[a-z0-9_]+)`", doc, flags=re.M)}
    assert table == exposed_families()
