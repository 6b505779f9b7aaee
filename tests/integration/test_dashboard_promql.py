"""The Grafana dashboard's queries are valid PromQL, as Prometheus's own ``promtool`` reads them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_dashboard import dashboard_exprs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package 'prometheus')")
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [{"record": f"check:{i}", "expr": e.replace("$__rate_interval", "5m").replace("$model", ".*")}
             for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stdout + proc.stderr
