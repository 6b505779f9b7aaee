"""The HTTP gateway across a broker crash: its requests, streamed or not, finish with their greedy text.

The gateway is a client of the broker through ``AsyncClient``, which resends what had
shown no output and waits for started streams to resume (docs/protocol.md, Broker
recovery). So an HTTP client sees nothing of a broker killed with SIGKILL but a pause.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from typing import Any

import pytest

from mlx_fleet.client import FleetError
from tests.integration.fleets import RunningFleet, fleet_status, make_config
from tests.integration.reference import greedy_reference
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MAX_TOKENS = 200
PROMPTS = ["Tell me about rivers.", "Tell me about clocks.", "Tell me about bread.", "Tell me about boats."]


def post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.status, resp.read()


def test_a_broker_killed_mid_answer_loses_no_http_request(demo_model: tuple[Any, Any]) -> None:
    cfg, ipc_dir = make_config(gateway=True, heartbeat_interval_s=0.2, restart_backoff_s=0.2)
    url = f"http://127.0.0.1:{cfg.http_port}/v1/completions"
    results: dict[int, tuple[int, bytes]] = {}
    with RunningFleet(cfg, ipc_dir) as fleet:
        def ask(i: int) -> None:
            body = {"model": "demo", "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0,
                    "stream": i % 2 == 0}
            results[i] = post(url, body)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        wait_for(lambda: fleet_status(cfg.frontend)["models"]["demo"]["running"] == len(PROMPTS), 60,
                 "every request to be running")
        old = fleet.child("broker").process.pid
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: fleet_status(cfg.frontend, timeout_s=0.5)["broker"]["pid"] != old, 30,
                 "a new broker", ignoring=(FleetError,))
        for t in threads:
            t.join(120)
    for i, prompt in enumerate(PROMPTS):
        status, raw = results[i]
        assert status == 200
        if i % 2 == 0:
            events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
        else:
            text = json.loads(raw)["choices"][0]["text"]
        assert text == greedy_reference(*demo_model, prompt, MAX_TOKENS)[1], (i, text)
