"""Decoding controls on a real trained model (SmolLM2-135M-Instruct), over raw pyzmq.

The random-weight demo model covers the same in tests/conformance/test_controls.py; a
trained model is where repetition and the pull of a grammar away from what the model
wants to say are real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.conformance.test_controls import _schema_outputs
from tests.integration.clients import RawClient, generate
from tests.integration.fleets import RunningFleet, make_config

pytestmark = [pytest.mark.integration, pytest.mark.real_model, pytest.mark.timeout(1800)]

JSON_PROMPT = [{"role": "user", "content": "Describe a made-up product as JSON."}]
REPEAT_PROMPT = [{"role": "user", "content": "Write the word 'hello' fifty times, separated by spaces."}]


@pytest.fixture(scope="module")
def fleet(smollm2_file: Path) -> Iterator[RunningFleet]:
    cfg, ipc_dir = make_config(models=(("chat", "smollm2", 1),))
    with RunningFleet(cfg, ipc_dir) as running:
        yield running


@pytest.fixture
def wire(fleet: RunningFleet) -> Iterator[RawClient]:
    w = RawClient(fleet.cfg.frontend)
    try:
        yield w
    finally:
        w.close()


@pytest.mark.slow
def test_fifty_random_schemas_validate_greedy_and_sampled(wire: RawClient) -> None:
    _schema_outputs(wire, "chat", 50, None, messages=JSON_PROMPT)


@pytest.mark.slow
def test_frequency_penalty_makes_a_repeating_answer_repeat_less(wire: RawClient) -> None:
    def repeats(request_id: str, **fields: object) -> int:
        wire.send(generate(request_id, "chat", prompt=None, messages=REPEAT_PROMPT, max_tokens=80, stream=False,
                           **fields))
        ids = wire.finish(request_id).end["token_ids"]
        return len(ids) - len(set(ids))

    plain, penalised = repeats("plain"), repeats("penalised", frequency_penalty=1.0)
    assert plain >= 30 and penalised < plain / 2, (plain, penalised)
