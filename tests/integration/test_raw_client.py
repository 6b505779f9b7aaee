"""The raw-pyzmq client from docs/protocol.md, run as written, gets a completion.

The snippet runs in a separate interpreter and imports only zmq and msgpack, so
the document stays true for clients in any language.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.fleets import start_fleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def doc_snippet() -> str:
    """The python block under 'A client in raw pyzmq'."""
    text = DOC.read_text()
    section = text[text.index("## A client in raw pyzmq"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_doc_snippet_imports_nothing_from_the_project():
    code = doc_snippet()
    imports = set(re.findall(r"^(?:import|from) (\w+)", code, re.M))
    assert imports <= {"uuid", "msgpack", "zmq"}


def test_raw_pyzmq_client_gets_a_completion():
    fleet = start_fleet(transport="tcp")
    try:
        code = doc_snippet().replace("tcp://127.0.0.1:5555", fleet.cfg.frontend)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        fleet.stop()
    assert proc.returncode == 0, proc.stderr
    assert "length" in proc.stdout and "completion_tokens" in proc.stdout
