"""The raw-pyzmq client from docs/protocol.md, run as written, gets a completion, and
carries on through a broker killed under it.

The snippet runs in a separate interpreter and imports only zmq and msgpack, so
the document stays true for clients in any language.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.fleets import fleet_status, start_fleet
from tests.integration.reference import greedy_reference
from tests.waiting import wait_for

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
    assert imports <= {"time", "uuid", "msgpack", "zmq"}


def test_raw_pyzmq_client_gets_a_completion():
    fleet = start_fleet(transport="tcp")
    try:
        code = doc_snippet().replace("tcp://127.0.0.1:5555", fleet.cfg.frontend)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        fleet.stop()
    assert proc.returncode == 0, proc.stderr
    assert "length" in proc.stdout and "completion_tokens" in proc.stdout


@pytest.mark.slow
def test_raw_pyzmq_client_carries_on_through_a_broker_kill(demo_model):
    """SIGKILL the broker while the snippet waits for its stream: its text equals in-process greedy mlx-lm."""
    max_tokens = 300
    want_ids, want_text = greedy_reference(*demo_model, "Hello", max_tokens)
    fleet = start_fleet(transport="tcp", restart_backoff_s=0.2, heartbeat_interval_s=0.2, heartbeat_liveness=5)
    try:
        code = doc_snippet().replace("tcp://127.0.0.1:5555", fleet.cfg.frontend)
        code = code.replace('"max_tokens": 32', f'"max_tokens": {max_tokens}')
        code += 'import json\nprint("RESULT", json.dumps({"text": "".join(text), "ids": token_ids}))\n'
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/")
        try:
            wait_for(lambda: fleet_status(fleet.cfg.frontend)["requests"] == 1, timeout_s=30, interval_s=0.01,
                     what="the snippet's request in flight")
            os.kill(fleet.child("broker").process.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        fleet.stop()
    assert proc.returncode == 0, err
    (line,) = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    got = json.loads(line[len("RESULT "):])
    assert (got["text"], got["ids"]) == (want_text, want_ids)
